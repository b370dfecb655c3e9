-- Runs once, on the first start of the postgres service (an empty volume): one database per server.
-- The mlflow database is POSTGRES_DB; Prefect's and MLflow basic-auth's user store get their own.
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
