"""Model components: 3D encoders (DCFormer, ViT3D), projectors, the original-layout converter.

Every encoder has ``out_channels: list[int]``, ``token_counts((D, H, W)) -> list[int]`` and
``forward((B, C, D, H, W)) -> list[(B, tokens_i, C_i)]``; every projector maps that list to
``(B, num_tokens, llm_dim)``.
"""
