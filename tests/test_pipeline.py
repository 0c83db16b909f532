"""The input pipeline: batches, per-host slices, iterator state, hard negatives."""

import numpy as np
import pytest

from dalle_jax.data import pipeline, shapes
from dalle_jax.tokenizer import Tokenizer


def test_batches_have_the_contracted_form():
    source = pipeline.ShapesBatches("train", 0, 32, 16, global_batch=8, hard_negatives=2)
    batch = source[3]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == np.int32
    assert batch["negative_tokens"].shape == (8, 2, 16)
    # Element k holds examples k*B .. k*B+B-1 of the dataset, exactly.
    images, captions = shapes.examples(range(24, 32), split="train", seed=0, size=32)
    np.testing.assert_array_equal(pipeline.to_uint8_images(batch["image"]), images)
    np.testing.assert_array_equal(batch["tokens"], Tokenizer()(captions, context_length=16))


def test_hosts_read_disjoint_slices_of_the_same_global_batch():
    whole = pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8)[5]
    parts = [pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8, process_index=p,
                                    process_count=4)[5] for p in range(4)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_iterator_state_restores_the_exact_position():
    dataset = pipeline.make_dataset(_data_config())
    it = pipeline.make_iterator(dataset, num_threads=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(2)]
    fresh = pipeline.make_iterator(dataset, num_threads=2)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["tokens"], want)


def test_hard_negatives_change_exactly_one_thing():
    rng = np.random.default_rng(0)
    for i in range(300):
        caption = shapes.scene(i, "train").caption
        negative = pipeline.hard_negative(caption, rng)
        assert negative != caption
        a, b = shapes.parse_caption(caption), shapes.parse_caption(negative)
        assert b is not None and len(a.objects) == len(b.objects)
        assert not any((o.colour, o.shape) in shapes.HELD_OUT for o in b.objects)
        if len(a.objects) == 1:
            fields = lambda p: (p.objects[0].colour, p.objects[0].shape, p.objects[0].size,
                                p.objects[0].position, p.background)
            assert sum(x != y for x, y in zip(fields(a), fields(b))) == 1


def test_minimal_pairs_put_each_scene_beside_its_counterfactual():
    source = pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8, minimal_pairs=True)
    batch = source[2]
    tokenize = Tokenizer()
    for i in range(4):  # element 2 holds scenes 8..11 and then their counterfactuals
        sc = shapes.scene(8 + i, "train")
        cf = shapes.counterfactual(sc, np.random.default_rng([0, 2, 8 + i]))
        np.testing.assert_array_equal(pipeline.to_uint8_images(batch["image"][i]),
                                      shapes.render(sc, 16))
        np.testing.assert_array_equal(pipeline.to_uint8_images(batch["image"][4 + i]),
                                      shapes.render(cf, 16))
        np.testing.assert_array_equal(batch["tokens"][4 + i],
                                      tokenize([cf.caption], context_length=16)[0])
    # Two hosts hold the same pairs between them: host p has scenes 8+2p, 9+2p and theirs.
    parts = [pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8, process_index=p,
                                    process_count=2, minimal_pairs=True)[2] for p in range(2)]
    for p, part in enumerate(parts):
        np.testing.assert_array_equal(part["image"][:2], batch["image"][2 * p:2 * p + 2])
        np.testing.assert_array_equal(part["image"][2:], batch["image"][4 + 2 * p:6 + 2 * p])
    # The GAN's counterfactual negatives (train/gan.py) pair each row with its partner in the
    # global batch the hosts' slices make, one host or two.
    rows = np.arange(8)
    np.testing.assert_array_equal(pipeline.minimal_pair_partners(rows, 1),
                                  [4, 5, 6, 7, 0, 1, 2, 3])
    assembled = np.concatenate([part["image"] for part in parts])
    partners = pipeline.minimal_pair_partners(assembled, 2)
    for p in range(2):
        for i in range(2):
            np.testing.assert_array_equal(partners[4 * p + i], parts[p]["image"][2 + i])
            np.testing.assert_array_equal(partners[4 * p + 2 + i], parts[p]["image"][i])
    np.testing.assert_array_equal(pipeline.minimal_pair_partners(batch["image"], 1)[:4],
                                  batch["image"][4:])


def _data_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(
        name="shapes", split="train", seed=0, image_size=16, context_length=16,
        global_batch=4, num_threads=1, hard_negatives=0))


def test_oversample_draws_the_named_kinds_that_many_times_as_often():
    def kinds(source, batches):
        counts, total = {}, 0
        for k in range(batches):
            for caption in _captions(source, k):
                total += 1
                parsed = shapes.parse_caption(caption)
                if len(parsed.objects) == 1 and parsed.objects[0].size:
                    key = (parsed.objects[0].size, parsed.objects[0].shape)
                    counts[key] = counts.get(key, 0) + 1
        return {key: n / total for key, n in counts.items()}

    plain = kinds(pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64), 40)
    source = pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64,
                                    oversample="small star:4, large circle:2")
    boosted = kinds(source, 40)
    # Rejection at factor / 4: each kind's share goes as its factor, renormalised.
    norm = sum(share * {("small", "star"): 4, ("large", "circle"): 2}.get(key, 1)
               for key, share in plain.items()) + (1 - sum(plain.values()))
    for key, factor in ((("small", "star"), 4), (("large", "circle"), 2), (("small", "square"), 1)):
        want = plain[key] * factor / norm
        assert abs(boosted[key] - want) < 0.25 * want, (key, boosted[key], want)
    # Still a pure function of the slot: the same batch twice, and per-host slices of it.
    np.testing.assert_array_equal(source[7]["image"], source[7]["image"])
    parts = [pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64, process_index=p,
                                    process_count=2, oversample="small star:4, large circle:2")[7]
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]),
                                  source[7]["tokens"])
    assert kinds(pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64, oversample=""),
                 40) == plain


def test_oversample_from_keeps_the_plain_stream_before_its_element():
    spec = "small star:20"
    plain = pipeline.ShapesBatches("train", 0, 8, 16, global_batch=16)
    boosted = pipeline.ShapesBatches("train", 0, 8, 16, global_batch=16, oversample=spec)
    phased = pipeline.ShapesBatches("train", 0, 8, 16, global_batch=16, oversample=spec,
                                    oversample_from=3)
    for k in range(6):
        want = plain[k] if k < 3 else boosted[k]
        np.testing.assert_array_equal(phased[k]["image"], want["image"])
        np.testing.assert_array_equal(phased[k]["tokens"], want["tokens"])
    # The two streams differ from element 3 on, so the comparison above can fail.
    assert not np.array_equal(plain[3]["tokens"], boosted[3]["tokens"])
    with pytest.raises(ValueError, match="oversample_from must be >= 0"):
        pipeline.ShapesBatches("train", 0, 8, 16, global_batch=8, oversample=spec,
                               oversample_from=-1)


def test_oversample_two_objects():
    def share(source):
        captions = [c for k in range(30) for c in _captions(source, k)]
        return sum(len(shapes.parse_caption(c).objects) == 2 for c in captions) / len(captions)

    plain = share(pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64))
    boosted = share(pipeline.ShapesBatches("train", 0, 8, 16, global_batch=64,
                                           oversample="two objects:3"))
    want = 3 * plain / (3 * plain + 1 - plain)  # 0.3 -> 0.56
    assert 0.25 < plain < 0.35 and abs(boosted - want) < 0.06, (plain, boosted, want)


def test_bad_oversample_is_one_clear_line():
    for spec in ("tiny star:3", "small star", "small star:0.5", "small:3", "small star:x",
                 "two object:3", "three objects:2"):
        with pytest.raises(ValueError, match="data.oversample item") as e:
            pipeline.ShapesBatches("train", 0, 8, 16, global_batch=8, oversample=spec)
        assert "\n" not in str(e.value)


def _captions(source, k):
    tokens = source[k]["tokens"]
    return [Tokenizer().decode(row) for row in tokens]
