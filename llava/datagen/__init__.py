"""GPT-assisted instruction generation: prompts, reply parsing and a rule-based teacher.

Network I/O lives in `llava_platform.teacher_client`; this package only builds messages and
turns replies into LLaVA records.
"""
