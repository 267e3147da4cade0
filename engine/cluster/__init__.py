"""Engine workers on Ray: one actor per device, each the same engine that runs in-process, fed by the bot's queue.

[engine] workers = "ray" in config.toml turns it on ([ray] says where and how many); `EngineService` then
runs its jobs through a `ClusterRunner` instead of its local worker thread. The modules:

- dispatcher.py: `ClusterRunner`, the threads that hand queued jobs to free workers and settle what comes back;
- routing.py: `Router`, which free worker starts which job (the one holding its models), and why;
- pool.py: connecting to Ray, starting and finding workers, checking their models folders against the bot's;
- actor.py: `EngineWorker`, the actor: an executor on its device, running batches, streaming their progress;
- files.py: input images out to a worker and result files back, as bytes ([ray] files = "bytes");
- join.py: `noodle worker --address ...`, a machine adding its own device to a running cluster;
- bench.py: `noodle bench cluster`, routing, throughput, dispatch overhead and recovery, measured.
"""
