import time, torch, sys
from torch.utils._python_dispatch import TorchDispatchMode
from collections import Counter
import icl_kernels
from icl_kernels.published import Query_Attention
torch.set_num_threads(1)
class Count(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c=Counter()
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        s.c[str(func.overloadpacket.__name__)]+=1
        return func(*args, **(kwargs or {}))
class Pub(torch.nn.Module):
    def __init__(s,C,H):
        super().__init__(); s.norm=torch.nn.LayerNorm(C); s.attn=Query_Attention(C,H,qkv_bias=True)
    def forward(s,q,x): return s.attn(q,s.norm(x))
B,K,C,H,N=2,4,32,4,64
torch.manual_seed(0)
pub=Pub(C,H)
mods={'published':pub}
for be in sys.argv[1:] or ['cpu']:
    m=icl_kernels.ProxyAttention(C,H,official_layout=True,token_norm=True,backend=be)
    m.fc_q.load_state_dict(pub.attn.fc_q.state_dict()); m.fc_kv.load_state_dict(pub.attn.fc_kv.state_dict()); m.proj.load_state_dict(pub.attn.proj.state_dict())
    mods['icl-'+be]=m
q=torch.randn(B,K,C,requires_grad=True); x=torch.randn(B,N,C,requires_grad=True)
def step(m):
    o,a=m(q,x); (o.sum()+a.sum()).backward()
for n,m in mods.items():
    o,a=m(q,x); print(n, (o-mods['published'](q,x)[0]).abs().max().item())
    step(m)
    with Count() as cm: step(m)
    print(n, sum(cm.c.values()), dict(cm.c.most_common()))
res={n:[] for n in mods}
for r in range(15):
    for n,m in mods.items():
        t=time.perf_counter()
        for i in range(100): step(m)
        res[n].append((time.perf_counter()-t)/100*1e6)
import statistics
for n in mods: print(n, 'us', round(statistics.median(res[n]),1), 'ratio', round(statistics.median([a/b for a,b in zip(res[n],res['published'])]),3))
