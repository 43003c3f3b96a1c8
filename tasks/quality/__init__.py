"""The quality gate: profiles compared with a baseline, canary prompts, holding and releasing
an output."""
