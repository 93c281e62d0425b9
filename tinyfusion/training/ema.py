"""Exponential moving average of a chosen set of parameters.

Training keeps it over every parameter (the `ema` model of a DiT checkpoint); learnable pruning
keeps it only over what trains (gate logits, LoRA), not over 675M frozen weights. Updates are
one fused `torch._foreach_lerp_` over the whole list instead of a Python loop per tensor.
"""
import torch


class ParameterEMA:
    def __init__(self, named_parameters, decay=0.9999):
        named_parameters = list(named_parameters)
        self.decay = decay
        self.names = [name for name, _ in named_parameters]
        self.sources = [param for _, param in named_parameters]
        self.shadows = [param.detach().clone().float() for param in self.sources]

    @torch.no_grad()
    def update(self, decay=None):
        """shadow <- decay * shadow + (1 - decay) * param."""
        decay = self.decay if decay is None else decay
        current = [param.detach().float() for param in self.sources]
        torch._foreach_lerp_(self.shadows, current, 1.0 - decay)

    def state_dict(self):
        return {name: shadow.clone() for name, shadow in zip(self.names, self.shadows)}

    def load_state_dict(self, state_dict):
        missing = [name for name in self.names if name not in state_dict]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:3]}; was it saved for a different model or trainable set?")
        for name, shadow in zip(self.names, self.shadows):
            shadow.copy_(state_dict[name])

    def model_state_dict(self, model):
        """`model.state_dict()` with the EMA values in place of the tracked parameters (what an
        inference checkpoint's "ema" entry holds)."""
        averaged = dict(zip(self.names, self.shadows))
        return {key: (averaged[key].to(value.dtype) if key in averaged else value.clone())
                for key, value in model.state_dict().items()}
