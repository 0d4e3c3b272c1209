"""The daemon: its parts wired together, their life, and the procedures it runs at start-up.

- `main`: the process (`masqd`): logging, allocator and collector tuning, signals, exit;
- `lifecycle`: `Daemon`, the composition root: `startup()`, `serve()`, `shutdown()`;
- `restore`: the desired state at start-up, from the journal and, if need be, the table;
- `spool_drain`: DELs the CNI plugin spooled while the daemon could not answer;
- `reload`: config reload on SIGHUP or a changed config file;
- `cni_adoption`: `--adopt-cni-plugins-rules` once the first sync is done.
"""
