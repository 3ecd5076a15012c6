"""The shared base, imported by every role and by no role's code in return: typed config and its validation,
the records that cross processes, the VLCoT chain grammar, the GRPO math, checkpoint files, the weight wire
format, images, placement and the actor-group base, process environment."""
