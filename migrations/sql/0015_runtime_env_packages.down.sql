DROP TABLE IF EXISTS runtime_env_packages;
