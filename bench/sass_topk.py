"""Development, no GPU needed: compile the retrieval forward kernel for sm_90 on this machine
(Triton's ptxas), print its registers / stack / barriers and every loop of its SASS with its
instruction count, and optionally an opcode histogram of one address range. The counts
predicted the H200 changes of bench/NOTES.md (sixth and seventh sessions).

    python bench/sass_topk.py [BM=64] [BN=64] [K=16] [TMA=0] [LANES=1] [SASS=out.sass] [HIST=start:end]

TMA=1 compiles the TMA loads of the score tiles (PEER_KERNELS_TMA=graphs or always; the
launcher's default is the pointer loads); LANES=0 compiles pass B with the tensor-core prefix
slots instead of the lane lists.

HIST takes two hex addresses from the loop list (e.g. HIST=40a0:5c40 for a pass-B loop)."""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def loops(ins):
    """SASS [(address, text)] in address order -> the (start, end) of each loop: a branch at
    end back to start (also used by ncu_topk.py to cut the profile into regions)."""
    out = []
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            out.append((int(m.group(1), 16), addr))
    return out


def main():
    sys.path.insert(0, os.path.join(HERE, ".."))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import peer_kernels  # noqa: F401  (loads csrc_triton)
    from peer_kernels.csrc_triton import product_key_topk as K

    opt = dict(a.split("=", 1) for a in sys.argv[1:])
    bm, bn, k = int(opt.get("BM", 64)), int(opt.get("BN", 64)), int(opt.get("K", 16))
    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sig = {"q_ptr": "*bf16", "keys_ptr": "*bf16", "keys_desc": f"tensordesc<bf16[{max(k, bn)}, 64]>",
           "scores_ptr": "*fp32", "ids_ptr": "*i64", "scratch_ptr": "*i64",
           "M": "i32", "n": "i32", "H": "i32"}
    groups = max(k, bn) if bm >= 64 else max(k, 32)  # as retrieval._fwd_config
    consts = dict(DK=128, DH_PAD=64, PER_HEAD=True, K=k, K_PAD=k, CAND=k, KP=k, GROUPS=groups, CAP=max(64, 2 * k),
                  BLOCK_M=bm, BLOCK_N=max(k, bn), EVEN_N=True, UPCAST=False, PRECISION="tf32", NATIVE=True,
                  PREFIX_SLOTS=bm >= 64, FALLBACK=opt.get("FALLBACK", "1") == "1",
                  TMA=bm >= 64 and opt.get("TMA", "0") == "1",  # retrieval._keys_descriptor (default: never)
                  LANES=K.pk_topk_lanes(True, bm, max(k, bn), groups, k) and opt.get("LANES", "1") == "1")
    consts = {a: v for a, v in consts.items() if a in K.pk_topk_fwd_kernel.arg_names}
    missing = [a for a in K.pk_topk_fwd_kernel.arg_names if a not in sig and a not in consts]
    if missing:
        sys.exit(f"set these kernel parameters in bench/sass_topk.py first: {missing}")
    sig.update({a: "constexpr" for a in consts})
    attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in sig if sig[a].startswith("*") or a in ("M", "n")}
    kern = triton.compile(ASTSource(fn=K.pk_topk_fwd_kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 128})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    if opt.get("SASS"):
        open(opt["SASS"], "w").write(sass)
    print(f"BM={bm} BN={bn} K={k}:", " ".join(l.strip() for l in usage.splitlines() if "REG" in l),
          "bar.sync", kern.asm["ptx"].count("bar.sync"), "shared (dynamic)", kern.metadata.shared)
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", l) for l in sass.splitlines()) if m]
    print("SASS instructions:", len(ins))
    print("loops (start end instructions; what they hold):")
    for start, end in loops(ins):
        body = [t for a, t in ins if start <= a <= end]
        tags = [name for name, pat in (("score MMA", "HGMMA.*BF16"), ("prefix MMA", "tnspB"), ("stores", "STG"),
                                       ("shuffles", "SHFL"), ("spills", "LDL")) if any(re.search(pat, t) for t in body)]
        print(f"  {start:#x} {end:#x} {len(body):5d}  {', '.join(tags)}")
    if opt.get("HIST"):
        lo, hi = (int(x, 16) for x in opt["HIST"].split(":"))
        ops = {}
        for a, t in ins:
            if lo <= a <= hi:
                op = (t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]
                ops[op] = ops.get(op, 0) + 1
        print("opcodes:", ", ".join(f"{o} {c}" for o, c in sorted(ops.items(), key=lambda x: -x[1])))


if __name__ == "__main__":
    main()
