"""Parameter counts of every size preset, for a 64x64x3 image env and a 4-dim vector env.

Run: python scripts/param_counts.py   (builds the models on the meta device: no memory, no time)
"""
import torch, numpy as np
from lit_dreamer.agent_config import SIZES, ModelConfig, BehaviorConfig
from lit_dreamer.world_model import WorldModel
from lit_dreamer.actor_critic import ActorCritic
def count(m): return sum(p.numel() for p in m.parameters() if p.requires_grad)
print("| preset | image 64x64x3, 6 discrete actions: WM / actor / critic / total | vector 4-dim, 2 discrete actions: WM / actor / critic / total |")
print("|---|---|---|")
for name in SIZES:
    row=[name]
    for spec,adim in (({"image":((64,64,3),np.uint8)},6),({"vector":((4,),np.float32)},2)):
        with torch.device("meta"):
            cfg=ModelConfig(size=name)
            wm=WorldModel(spec,adim,cfg); ac=ActorCritic(wm.rssm.feat_dim,adim,True,cfg,BehaviorConfig())
        a,b,c=count(wm),count(ac.actor),count(ac.critic)
        f=lambda n: f"{n/1e6:.2f}M"
        row.append(f"{f(a)} / {f(b)} / {f(c)} / **{f(a+b+c)}**")
    print("| "+" | ".join(row)+" |")
