"""Two gloo processes: global in-batch negatives span both ranks, and the gradient each rank
gets equals the single-process full-batch gradient (after DeepSpeed's mean over ranks)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from mmemb.losses.infonce import info_nce
from mmemb.training.distributed import free_port

B, H, W, TAU = 3, 4, 2, 0.1


def _data():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(W * B, H, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(W * B, H, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(W * B, 2, H, generator=g), dim=-1)
    keys = torch.arange(W * B)
    keys[4] = keys[1]  # rank 1's row 1 has the same target as rank 0's row 1
    return q, t, neg, keys


def _worker(r: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=W)
    try:
        q, t, neg, keys = _data()
        sl = slice(r * B, (r + 1) * B)
        ql = q[sl].clone().requires_grad_(True)
        tl = t[sl].clone().requires_grad_(True)
        res = info_nce(ql, tl, tau=TAU, hard_neg=neg[sl], keys=keys[sl])
        res.loss.backward()
        torch.save({"q_grad": ql.grad, "t_grad": tl.grad, "labels": res.labels,
                    "logits": res.logits.detach(), "loss": res.loss.detach(),
                    "n_candidates": res.n_candidates}, f"{out}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=W, join=True)
    q, t, neg, keys = _data()
    qf, tf = q.clone().requires_grad_(True), t.clone().requires_grad_(True)
    # Single process over the global batch: query i vs all W*B positives + its hard negatives.
    full = info_nce(qf, tf, tau=TAU, hard_neg=neg, keys=keys, gather=False)
    full.loss.backward()
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    for r, d in enumerate(res):
        sl = slice(r * B, (r + 1) * B)
        assert d["labels"].tolist() == [r * B + i for i in range(B)]  # offset by rank
        assert d["logits"].shape == (B, W * B + 2) and d["n_candidates"] == W * B + 2
        # the candidate columns are the other rank's targets too: the same logits as full
        assert torch.allclose(d["logits"], full.logits[sl].detach(), atol=1e-6)
        # DeepSpeed averages parameter gradients over ranks: rank grads / W = full grads
        assert torch.allclose(d["q_grad"] / W, qf.grad[sl], atol=1e-6)
        assert torch.allclose(d["t_grad"] / W, tf.grad[sl], atol=1e-6)
    # the duplicate target across ranks is masked for both rows that have it
    assert torch.isinf(res[0]["logits"][1, 4]) and torch.isinf(res[1]["logits"][1, 1])
    mean_loss = (res[0]["loss"] + res[1]["loss"]) / 2
    assert torch.allclose(mean_loss, full.loss.detach(), atol=1e-6)
    # without the all-reduce in backward, rank 0's targets would miss rank 1's push:
    assert float((tf.grad[:B] * W - res[0]["t_grad"]).abs().max()) < 1e-6
    assert float(tf.grad[:B].abs().max()) > 1e-3
