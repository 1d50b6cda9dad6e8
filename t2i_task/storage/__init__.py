"""What is kept: DashAI's tables, the store, the database connection, the schema and its migrations; imports only t2i_task.config."""
