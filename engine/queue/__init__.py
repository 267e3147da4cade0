"""The job queue: a persistent, fair queue around one worker thread that owns the device.

A front end submits a ComfyUI workflow to `EngineService` and follows the job's `JobEvent`s. The
modules, in the order a job passes them:

- service.py: `EngineService` and `JobHandle`, on the event loop: submit, cancel, follow, list;
- jobs.py: a job's data: `Owner`, `JobState`, `JobEvent`, `JobInfo` (a /queue row), `JobRecord`;
- job_store.py: `JobStore`, every job and each change of its state in SQLite, so a restart resumes;
- state_table.py: `JobTable`, every job's state under one lock, shared with the worker thread;
- fairness.py: `FairQueue`, the round-robin order across users, batches, positions and ETAs;
- worker.py: `run_jobs` (a batch on an executor) and `settle`, and `Worker`, the thread that runs them in this
  process ([engine] workers = "ray" runs them on Ray workers instead: engine/cluster/);
- messages.py: what the owner of a job the queue stopped or could not run is told;
- batching.py: which queued jobs can share one sampler call, and running them as one batch;
- bench.py: `noodle bench queue`, what batching and caching buy, measured.
"""

from engine.errors import JobCancelled, JobFailed, QueueFull
from engine.queue.job_store import JobStore
from engine.queue.jobs import ENDED, JobEvent, JobInfo, JobRecord, JobState, Owner
from engine.queue.service import EngineService, JobHandle

__all__ = ["ENDED", "EngineService", "JobCancelled", "JobEvent", "JobFailed", "JobHandle", "JobInfo", "JobRecord",
           "JobState", "JobStore", "Owner", "QueueFull"]
