"""What happens after a job is queued: progress.py merges a request's job events, status.py throttles them onto a
front end's status line, collector.py stores what ended and posts each result once, verdict.py is a request's
stored outcome, files.py names and removes result files, retention.py prunes old ones."""
