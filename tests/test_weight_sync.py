"""core.weights: bucketing, casting, safetensors round trip, stats."""

import pytest
import torch

from core import weights as ws


def _state_dict():
    torch.manual_seed(0)
    # float32 sizes: a 40 B, b 400 B, c 24 B, d 80 B (int64, 10 x 8 B), e 1200 B, f 4 B
    return {
        "a": torch.randn(10),
        "b": torch.randn(10, 10),
        "c": torch.randn(2, 3),
        "d": torch.arange(10),
        "e": torch.randn(300),
        "f": torch.randn(()),
    }


def test_buckets_respect_the_size_limit_keep_order_and_never_split_a_tensor():
    sd = _state_dict()
    buckets = list(ws.bucket_named_tensors(sd, bucket_bytes=500))
    # greedy in order with limit 500: [a 40 + b 400 = 440] (+c would be 464, +d 544 > 500)
    #   -> a, b, c = 464; d: 464 + 80 > 500 -> new bucket [d 80]; e 1200 > 500 alone; [f 4]
    assert [[n for n, _ in b] for b in buckets] == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    assert [ws.bucket_nbytes(b) for b in buckets] == [464, 80, 1200, 4]
    for b in buckets:
        assert ws.bucket_nbytes(b) <= 500 or len(b) == 1  # only a lone oversized tensor exceeds it
    flat = [(n, t) for b in buckets for n, t in b]
    assert [n for n, _ in flat] == list(sd)
    for n, t in flat:
        assert torch.equal(t, sd[n])


def test_bucket_dtype_cast_only_touches_floating_tensors():
    sd = _state_dict()
    buckets = list(ws.bucket_named_tensors(sd.items(), bucket_bytes=500, dtype=torch.bfloat16))
    flat = dict(t for b in buckets for t in b)
    assert flat["b"].dtype == torch.bfloat16 and flat["d"].dtype == torch.int64
    torch.testing.assert_close(flat["b"].float(), sd["b"], atol=1e-2, rtol=1e-2)
    # sizes are counted after the cast: bf16 halves a, b, c, e, f
    #   -> [a 20 + b 200 + c 12 + d 80 = 312], [e 600], [f 2]
    assert [ws.bucket_nbytes(b) for b in buckets] == [312, 600, 2]


def test_bucket_bad_input():
    with pytest.raises(ValueError, match="bucket_bytes must be a positive int"):
        list(ws.bucket_named_tensors({"a": torch.zeros(1)}, 0))
    with pytest.raises(ValueError, match="tensor name 'a' appears twice"):
        list(ws.bucket_named_tensors([("a", torch.zeros(1)), ("a", torch.ones(1))], 100))


def test_serialize_round_trip_preserves_names_order_values_and_metadata():
    sd = _state_dict()
    # names chosen so that the original order is not alphabetical
    bucket = [("z.weight", sd["b"]), ("a.bias", sd["a"]), ("m.ids", sd["d"]), ("k.scalar", sd["f"])]
    data = ws.serialize_bucket(bucket, metadata={"version": "7"})
    assert isinstance(data, bytes)
    out = ws.deserialize_bucket(data)
    assert [n for n, _ in out] == ["z.weight", "a.bias", "m.ids", "k.scalar"]
    for (n0, t0), (n1, t1) in zip(bucket, out):
        assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape and torch.equal(t0, t1)
    assert ws.bucket_metadata(data)["version"] == "7"
    with pytest.raises(ValueError, match="reserved"):
        ws.serialize_bucket(bucket, metadata={ws.ORDER_KEY: "x"})


def test_serialize_tied_and_non_contiguous_tensors():
    emb = torch.randn(4, 3)
    bucket = [("embed.weight", emb), ("lm_head.weight", emb), ("t", emb.t()), ("q", emb[:2]), ("k", emb[2:])]
    out = dict(ws.deserialize_bucket(ws.serialize_bucket(bucket)))
    assert torch.equal(out["lm_head.weight"], emb) and torch.equal(out["t"], emb.t())
    assert torch.equal(out["q"], emb[:2]) and torch.equal(out["k"], emb[2:])


def test_round_trip_of_a_module_through_buckets():
    torch.manual_seed(1)
    src, dst = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    stats = ws.WeightSyncStats()
    received = []
    with stats.timed():
        for bucket in ws.bucket_named_tensors(src.state_dict(), bucket_bytes=256):
            stats.add_bucket(bucket)
            received.extend(ws.deserialize_bucket(ws.serialize_bucket(bucket)))
    dst.load_state_dict(dict(received))
    x = torch.randn(3, 16)
    assert torch.equal(dst(x), src(x))
    # weight 8*16*4 = 512 B (> 256, alone), bias 32 B
    assert (stats.num_bytes, stats.num_tensors, stats.num_buckets) == (544, 2, 2)
    assert stats.seconds > 0
    m = stats.metrics()
    assert m["weight_sync/bytes"] == 544.0 and m["weight_sync/buckets"] == 2.0
    assert m["weight_sync/gib_per_s"] > 0


def test_deserialize_rejects_foreign_bytes():
    from safetensors.torch import save

    with pytest.raises(ValueError, match="lack the 'weight_sync.names' metadata"):
        ws.deserialize_bucket(save({"a": torch.zeros(2)}))
    with pytest.raises(ValueError, match="not a safetensors buffer"):
        ws.bucket_metadata(b"abc")
