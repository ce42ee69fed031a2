"""Other durable-workflow engines run side by side with flowcopy by `flowcopy bench --peer`."""
