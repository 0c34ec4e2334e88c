"""Tasks and data: the paper's tasks as prompt/response pairs from local files or the hub
(``data.tasks``), the offline ``demo`` task (``data.demo``), and fixed-shape batching with a resumable
order (``data.batching``, also the plain-text batches of the LM loss), where rows come from
(``data.sources``) and which tokenizer reads them (``data.tokenizers``)."""
