"""Commands on finished or running runs: export, masked-LM evaluation, report."""
