"""The service in production: what an SRE watches (`/metrics`, `/healthz`, `/readyz`, the
status page), how systemd runs it (sd_notify, the unit file), and the schedules in view
(`flowcopy schedules`, `flowcopy trigger`). Everything here only watches the scheduler and
the engine through their observer hooks and the journal interface; nothing here decides."""
