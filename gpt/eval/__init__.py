"""Everything that reads a finished run or outside weights: loading (`pretrained`), Hugging Face conversion
and tokenizer files (`hf`, `hf_tokenizer`), HellaSwag (`hellaswag`), batched scoring (`scoring`) and the
lm-evaluation-harness model class (`lm_eval_model`). It never imports the training loop; the trainer uses it
for `train.init_from` and in-loop HellaSwag."""
