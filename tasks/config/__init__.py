"""What a job asks for: the validated job config, its quality and output-schema sections, and
device prices."""
