"""Meta-learning the difference (Hou, Salazar, Polovets, TACL 2022): TARP, TAMS and first-order MAML
over a multi-domain task distribution, against zero-shot, fine-tuning, LoRA and a multitask control."""
