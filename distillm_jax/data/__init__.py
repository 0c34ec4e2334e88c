"""Tasks and data. Today: the offline ``demo`` task (``data.demo``). The hub/local tasks (dolly, samsum,
iwslt2017, openwebtext) and fixed-shape batching arrive with the trainer (issue 5)."""
