"""Command options -> a checked request -> `WorkflowParams`: option parsers (options.py), the one name resolver
(names.py), /imagine's request model (imagine.py), prompt expansion (prompt.py), uploaded images (uploads.py),
uploaded workflows (workflow_file.py), /tokens (tokens.py)."""
