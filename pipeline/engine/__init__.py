"""The DeepSpeed engine: building it, its step, its rebuild around a ticket, the process group and its guards."""
