-- Runs once, when the postgres volume is first initialised. POSTGRES_DB (prefect) exists already;
-- MLflow gets a database of its own on the same server, owned by POSTGRES_USER.
CREATE DATABASE mlflow;
