"""flowcopy: application-consistent FlashCopy backups of VMware VMs, run by a durable engine."""

__version__ = "0.1.0"
