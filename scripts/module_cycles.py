#!/usr/bin/env python3
"""Module graph of src/ and its cycles: `python3 scripts/module_cycles.py [depth]` prints each
module's imports (crate:: and super:: paths outside comments and tests) at that depth and the
strongly connected components (an empty list under SCCs: no cycles). See docs/architecture.md."""
import os,re,collections,sys
root='src'
edges=collections.defaultdict(lambda: collections.defaultdict(list))
depth=int(sys.argv[1]) if len(sys.argv)>1 else 1
def modof(path):
    rel=os.path.relpath(path,root)[:-3]
    parts=rel.split('/')
    if parts[-1]=='mod': parts=parts[:-1]
    return parts
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f)
        parts=modof(p)
        if parts in (['lib'],['main']): continue
        src='::'.join(parts[:depth])
        text=open(p).read()
        # strip test modules roughly
        text=re.split(r'#\[cfg\(test\)\]\s*mod tests',text)[0]
        text='\n'.join(l for l in text.split('\n') if not l.strip().startswith('//'))
        refs=[m.group(1).split('::') for m in re.finditer(r'crate::(\w+(?:::\w+)*)',text)]
        for m in re.finditer(r'\b((?:super::)+)(\w+(?:::\w+)*)',text):
            n=m.group(1).count('super')
            base=parts[:-n] if n<=len(parts) else []
            refs.append(base+m.group(2).split('::'))
        for segs0 in refs:
            segs=[s for s in segs0 if s][:depth]
            tgt='::'.join(segs)
            if tgt.split('::')[0]!=src.split('::')[0] or (depth>1 and tgt!=src):
                if tgt!=src: edges[src][tgt].append(p)
tops=sorted(edges)
for a in tops:
    print(a,'->',' '.join(sorted(edges[a])))
# cycles
import itertools
print('--- 2-cycles')
for a in edges:
    for b in edges[a]:
        if a<b and a in edges.get(b,{}):
            print(a,'<->',b, '|', sorted(set(edges[a][b]))[:3], '|', sorted(set(edges[b][a]))[:3])
print('--- SCCs')
idx={};low={};st=[];on=set();res=[];c=[0]
nodes=set(edges)|{b for a in edges for b in edges[a]}
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,{}):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(comp)
for v in sorted(nodes):
    if v not in idx: sc(v)
for r in res: print(sorted(r))
