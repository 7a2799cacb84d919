"""Why is MiniLM's segmented pipeline 1.3x its fused one-graph model? (docs/benchmarks.md,
"Compute floor on a quiet machine".) Times, in Python ORT on the bench repository's graphs:

- seg4: the served cut, 4 graphs per layer (attention, attention slot, ffn, ffn slot);
- seg2: every plain slot merged into the following segment (2 graphs per layer), the slot's output
  chosen per row by `Where(plain, LN(h + x), x)` as an adapter-aware variant would need;
- the fused one-graph model (the compute floor);

each with numpy round trips and with ORT values passed straight through. Checks seg2 == seg4.
Run after `make bench` built build/bench-repo:
    .venv/bin/python tools/experiments/segment_merge.py
"""
import time

import numpy as np
import onnx
import onnx.compose as C
import onnxruntime as ort
from onnx import helper as H, TensorProto as TP
R='build/bench-repo/backbones/minilm'
so=ort.SessionOptions(); so.intra_op_num_threads=2; so.log_severity_level=3
so.add_session_config_entry('session.intra_op.allow_spinning','0')
mk=lambda m: ort.InferenceSession(m if isinstance(m,str) else m.SerializeToString(),so,providers=['CPUExecutionProvider'])
def load(i,k): return onnx.load(f'{R}/layers/{i}/{k}.onnx')
def pre(m,p): return C.add_prefix(m,p)
def combo(slot, seg, seg_inputs, pfx):
    # (h, x, plain[B]) -> y = where(plain, slot(h,x), x) -> seg(y, ...) ; outputs y, h_next
    s=pre(slot,'s_'); g=pre(seg,'g_')
    # build where node graph
    nodes=list(s.graph.node)+[H.make_node('Unsqueeze',['plain','ax'],['plain3']),H.make_node('Where',['plain3','s_y','x'],['y'])]
    inits=list(s.graph.initializer)+[H.make_tensor('ax',TP.INT64,[2],[1,2])]
    # rename seg's hidden input to y
    rn={'g_'+seg_inputs[0]:'y'}
    for n in g.graph.node:
        n.input[:]=[rn.get(i, i) for i in n.input]
    nodes+=list(g.graph.node); inits+=list(g.graph.initializer)
    ins=[H.make_tensor_value_info('h',TP.FLOAT,['b','t',384]),H.make_tensor_value_info('x',TP.FLOAT,['b','t',384]),H.make_tensor_value_info('plain',TP.BOOL,['b'])]
    for extra in seg_inputs[1:]:
        vi=[v for v in g.graph.input if v.name=='g_'+extra][0]; ins.append(vi)
    # slot inputs s_h, s_x -> h, x
    for n in nodes:
        n.input[:]=[{'s_h':'h','s_x':'x'}.get(i,i) for i in n.input]
    outs=[H.make_tensor_value_info('y',TP.FLOAT,['b','t',384]),H.make_tensor_value_info('g_h',TP.FLOAT,['b','t',384])]
    graph=H.make_graph(nodes,pfx,ins,outs,inits)
    m=H.make_model(graph,opset_imports=seg.opset_import); m.ir_version=seg.ir_version
    return m
emb=mk(f'{R}/embeddings.onnx')
att0=mk(f'{R}/layers/0/attention.onnx')
A=[]; F=[]
for i in range(6):
    F.append(mk(combo(load(i,'attention_slot'),load(i,'ffn'),['hidden'],f'f{i}')))
    if i<5: A.append(mk(combo(load(i,'ffn_slot'),load(i+1,'attention'),['hidden','attention_mask'],f'a{i}')))
last=mk(f'{R}/layers/5/ffn_slot.onnx')
fused=mk('build/bench-repo/fused/minilm/model.onnx')
L=[{k:mk(f'{R}/layers/{i}/{k}.onnx') for k in ['attention','attention_slot','ffn','ffn_slot']} for i in range(6)]
rng=np.random.default_rng(0)
ids=rng.integers(1000,30000,(8,128)).astype(np.int64); tt=np.zeros_like(ids); mask=np.ones_like(ids)
plain=np.ones(8,bool)
def seg4():
    x=emb.run(None,{'input_ids':ids,'token_type_ids':tt})[0]
    for l in L:
        h=l['attention'].run(None,{'hidden':x,'attention_mask':mask})[0]
        x=l['attention_slot'].run(None,{'h':h,'x':x})[0]
        h=l['ffn'].run(None,{'hidden':x})[0]
        x=l['ffn_slot'].run(None,{'h':h,'x':x})[0]
    return x
def seg2():
    x=emb.run(None,{'input_ids':ids,'token_type_ids':tt})[0]
    h=att0.run(None,{'hidden':x,'attention_mask':mask})[0]
    for i in range(6):
        x,h=F[i].run(None,{'h':h,'x':x,'plain':plain})
        if i<5: x,h=A[i].run(None,{'h':h,'x':x,'plain':plain,'g_attention_mask':mask})
    return last.run(None,{'h':h,'x':x})[0]
feeds={'input_ids':ids,'token_type_ids':tt,'attention_mask':mask}
fu=lambda: fused.run(None,feeds)
print('max diff', np.abs(seg4()-seg2()).max())
def t(f,n=15):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return np.median(ts)*1e3
for _ in range(3):
    a,b,c=t(seg4),t(seg2),t(fu); print(f'seg4 {a:.1f} seg2 {b:.1f} fused {c:.1f}  seg4/f {a/c:.2f} seg2/f {b/c:.2f}')
OV=ort.OrtValue
oids,ott,omask,oplain=[OV.ortvalue_from_numpy(a) for a in (ids,tt,mask,plain)]
def r(s,feed): return s.run_with_ort_values(None,feed)
def seg4v():
    x=r(emb,{'input_ids':oids,'token_type_ids':ott})[0]
    for l in L:
        h=r(l['attention'],{'hidden':x,'attention_mask':omask})[0]
        x=r(l['attention_slot'],{'h':h,'x':x})[0]
        h=r(l['ffn'],{'hidden':x})[0]
        x=r(l['ffn_slot'],{'h':h,'x':x})[0]
    return x
def seg2v():
    x=r(emb,{'input_ids':oids,'token_type_ids':ott})[0]
    h=r(att0,{'hidden':x,'attention_mask':omask})[0]
    for i in range(6):
        x,h=r(F[i],{'h':h,'x':x,'plain':oplain})
        if i<5: x,h=r(A[i],{'h':h,'x':x,'plain':oplain,'g_attention_mask':omask})
    return r(last,{'h':h,'x':x})[0]
fv=lambda: r(fused,{'input_ids':oids,'token_type_ids':ott,'attention_mask':omask})
for _ in range(3):
    a,b,c=t(seg4v),t(seg2v),t(fv); print(f'ortvalues: seg4 {a:.1f} seg2 {b:.1f} fused {c:.1f}  seg4/f {a/c:.2f} seg2/f {b/c:.2f}')
# Each segment alone, repeated on one fixed input (its state from a chained pass).
x = emb.run(None, {'input_ids': ids, 'token_type_ids': tt})[0]
alone = t(lambda: emb.run(None, {'input_ids': ids, 'token_type_ids': tt}))
for l in L:
    h = l['attention'].run(None, {'hidden': x, 'attention_mask': mask})[0]
    alone += t(lambda: l['attention'].run(None, {'hidden': x, 'attention_mask': mask}))
    x1 = l['attention_slot'].run(None, {'h': h, 'x': x})[0]
    alone += t(lambda: l['attention_slot'].run(None, {'h': h, 'x': x}))
    h2 = l['ffn'].run(None, {'hidden': x1})[0]
    alone += t(lambda: l['ffn'].run(None, {'hidden': x1}))
    x = l['ffn_slot'].run(None, {'h': h2, 'x': x1})[0]
    alone += t(lambda: l['ffn_slot'].run(None, {'h': h2, 'x': x1}))
c = t(fu)
print(f'segments timed alone, summed: {alone:.1f} ms, fused {c:.1f} ms: {alone / c:.2f}x')
