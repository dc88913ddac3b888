"""Fine-tuning (`earlybert finetune`): its config, tasks (GLUE, SQuAD, your data), their data, the loop, evaluation."""
