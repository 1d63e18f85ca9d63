"""`l2s distill`: LoRAs that move l2s's steering into the weights (docs/distill.md).

``lora``: attach, save (diffusers format + card), merge into a backbone; ``data``: steered
images the classifier accepts; ``train``: the resumable LoRA fine-tuning on them (recipe
"self"); ``reward``: the classifier's loss as a reward (recipe "reward"); ``job``: the job.
"""
