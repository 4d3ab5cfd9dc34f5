"""The paper's trial sets: sizes, K x N x N balance, entropy conditions, determinism and CMA pair conditions."""

from collections import Counter

import pytest

from vismech.scenes import (
    COLORS, CONDITIONS, PCA_CELLS, PCA_CONJUNCTIONS, SHAPES, cma_pairs, color_retrieval_set, counting_set,
    entropy_set, knn_protocol, pca_set, relabs_set, scene_description_set, spatial_relation_set,
)


def conj(o):
    return (o.color, o.shape)


def check_description(t):
    """A scene-description trial names every object but the target, each once, and the target is in the scene."""
    assert t.target in t.scene.objects and t.target not in t.mentioned
    assert set(t.mentioned) == set(t.scene.objects) - {t.target}
    assert [t.prompt[a:b] for a, b in t.mentions] == [o.name for o in t.mentioned]
    assert t.answer == t.target.name


def check_knn(trials, k, n):
    assert len(trials) == k * n * n
    combos = Counter((conj(t.target), t.target.cell) for t in trials)
    assert len(combos) == n * n and set(combos.values()) == {k}
    for t in trials:
        assert len(t.scene.objects) == n
        assert len({conj(o) for o in t.scene.objects}) == n  # unique conjunctions
        assert list(t.target.cell) == t.meta["target_cell"]
        check_description(t)


@pytest.fixture(scope="module")
def pca():
    return pca_set(k=200, seed=0)


def test_pca_set(pca):
    check_knn(pca, 200, 6)
    assert len(pca) == 7200
    assert {t.target.cell for t in pca} == set(PCA_CELLS) == {(r, c) for r in range(3) for c in (0, 2)}
    assert {conj(t.target) for t in pca} == set(PCA_CONJUNCTIONS)
    assert all(t.scene.grid == (3, 3) and all(o.cell[1] != 1 for o in t.scene.objects) for t in pca)
    assert {t.meta["target_index"] for t in pca} == set(range(6))
    # the others really are permuted: many distinct arrangements and description orders per combination
    first = [t for t in pca if t.meta["target_index"] == 0 and t.meta["cell_index"] == 0]
    assert len({t.scene.objects for t in first}) > 50
    assert len({t.prompt for t in first}) > 50


def test_pca_is_deterministic(pca):
    again = pca_set(k=200, seed=0)
    assert again == pca and [t.meta for t in again] == [t.meta for t in pca]
    assert [t.prompt for t in pca_set(k=5, seed=1)] != [t.prompt for t in pca_set(k=5, seed=0)]


@pytest.mark.parametrize("grid,k,n,total", [((2, 2), 100, 4, 1600), ((3, 3), 50, 9, 4050)])
def test_entropy_sets(grid, k, n, total):
    low, high = entropy_set(grid, "low", seed=0), entropy_set(grid, "high", seed=0)
    side = grid[0]
    for trials, cond in ((low, "low"), (high, "high")):
        check_knn(trials, k, n)
        assert len(trials) == total
        assert {t.meta["entropy"] for t in trials} == {cond}
    for t in low:  # every colour and every shape is used `side` times in each scene
        assert set(Counter(o.color for o in t.scene.objects).values()) == {side}
        assert set(Counter(o.shape for o in t.scene.objects).values()) == {side}
    for t in high:  # all colours and all shapes distinct
        assert len({o.color for o in t.scene.objects}) == n and len({o.shape for o in t.scene.objects}) == n
    assert entropy_set(grid, "low", k=2, seed=3)[5].to_json() == entropy_set(grid, "low", k=2, seed=3)[5].to_json()


def test_entropy_errors_and_vocab_arguments():
    with pytest.raises(ValueError, match="'low' or 'high'"):
        entropy_set((2, 2), "medium", k=1)
    with pytest.raises(ValueError, match="2x2 and 3x3"):
        entropy_set((4, 4), "low", k=1)
    with pytest.raises(ValueError, match="needs 4 conjunctions"):
        entropy_set((2, 2), "low", k=1, colors=("red", "blue", "green"), shapes=("circle", "star"))
    t = entropy_set((2, 2), "low", k=1, colors=("pink", "cyan"), shapes=("heart", "cross"))
    assert {o.color for o in t[0].scene.objects} == {"pink", "cyan"}


def test_relabs_set():
    k = 3
    trials = relabs_set(k=k, seed=0)
    assert len(trials) == 4 * 4 * 4 * k
    assert Counter(t.meta["arrangement"] for t in trials) == {a: 16 * k for a in range(4)}
    for t in trials:
        cells = {o.cell for o in t.scene.objects}
        assert len(cells) == 4 and (1, 1) in cells and t.scene.grid == (3, 3)
        rows, cols = {c[0] for c in cells}, {c[1] for c in cells}
        assert len(rows) == 2 and len(cols) == 2 and min(rows) + 1 == max(rows) and min(cols) + 1 == max(cols)
        assert len(t.mentioned) == 3
        check_description(t)
        r0, c0 = min(rows), min(cols)
        assert t.meta["absolute_cell"] == list(t.target.cell)
        assert t.meta["relative_cell"] == [t.target.cell[0] - r0, t.target.cell[1] - c0]
    origins = {a: {(min(o.cell[0] for o in t.scene.objects), min(o.cell[1] for o in t.scene.objects))
                   for t in trials if t.meta["arrangement"] == a} for a in range(4)}
    assert origins == {0: {(0, 0)}, 1: {(0, 1)}, 2: {(1, 0)}, 3: {(1, 1)}}
    # balance within each arrangement
    for a in range(4):
        combos = Counter((conj(t.target), t.target.cell) for t in trials if t.meta["arrangement"] == a)
        assert len(combos) == 16 and set(combos.values()) == {k}


def test_knn_protocol_checks_and_color_retrieval_task():
    with pytest.raises(ValueError, match="unique"):
        knn_protocol([("red", "circle"), ("red", "circle")], [(0, 0), (0, 1)], (2, 2), 1, 0)
    with pytest.raises(ValueError, match="as many unique cells"):
        knn_protocol([("red", "circle")], [(0, 0), (0, 1)], (2, 2), 1, 0)
    with pytest.raises(ValueError, match="valid colours"):
        knn_protocol([("mauve", "circle")], [(0, 0)], (2, 2), 1, 0)
    trials = knn_protocol([("red", "circle"), ("blue", "star")], [(0, 0), (1, 1)], (2, 2), 2, 0,
                          task="color_retrieval")
    assert len(trials) == 8 and {t.answer for t in trials} == {"red", "blue"}
    assert all(t.answer == t.target.color for t in trials)


@pytest.mark.parametrize("entropy", [None, "low", "high"])
def test_scene_description_set(entropy):
    trials = scene_description_set(40, (3, 3), n_objects=5, seed=2, entropy=entropy)
    assert len(trials) == 40
    for t in trials:
        assert len(t.scene.objects) == 5 and len({conj(o) for o in t.scene.objects}) == 5
        check_description(t)
        colors, shapes = {o.color for o in t.scene.objects}, {o.shape for o in t.scene.objects}
        if entropy == "high":
            assert len(colors) == len(shapes) == 5
        if entropy == "low":
            assert len(colors) <= 3 and len(shapes) <= 3
    assert len({t.target.cell for t in trials}) > 3
    full = scene_description_set(3, (2, 2), seed=0)
    assert all(len(t.scene.objects) == 4 for t in full)
    with pytest.raises(ValueError, match=r"2x2 grid has 4 cell\(s\), too few for 5 objects"):
        scene_description_set(1, (2, 2), n_objects=5)


def test_color_retrieval_set():
    trials = color_retrieval_set(50, (2, 2), seed=0)
    for t in trials:
        objs = t.scene.objects
        assert len(objs) == 2 and objs[0].color != objs[1].color and objs[0].shape != objs[1].shape
        assert t.answer == t.target.color and t.prompt[slice(*t.mentions[0])] == t.target.shape
        assert {o.color for o in objs} <= {"red", "green", "blue"}
        assert {o.shape for o in objs} <= {"circle", "square", "triangle"}
    assert len({t.answer for t in trials}) == 3


def test_spatial_relation_set():
    trials = spatial_relation_set(60, seed=0)
    steps = {"above": (-1, 0), "below": (1, 0), "left": (0, -1), "right": (0, 1)}
    for t in trials:
        assert len(t.scene.objects) == 9 and len({o.color for o in t.scene.objects}) == 9
        ref, rel = t.mentioned[0], t.meta["relation"]
        dr, dc = steps[rel]
        expected = t.scene.at((ref.cell[0] + dr, ref.cell[1] + dc))
        assert expected is not None and t.target == expected and t.answer == expected.color
        assert t.prompt[slice(*t.mentions[0])] == ref.name
        assert f"directly {rel} of the {ref.name}." in t.prompt
    assert set(Counter(t.meta["relation"] for t in trials)) == set(steps)


def test_counting_set():
    trials = counting_set(200, seed=0)
    counts = Counter(int(t.answer) for t in trials)
    assert set(counts) == set(range(3, 9))
    for t in trials:
        objs = t.scene.objects
        assert int(t.answer) == len(objs) == t.meta["count"] and t.target is None
        assert len({conj(o) for o in objs}) == len(objs)
        assert {o.color for o in objs} <= {"red", "blue", "green", "yellow"}
        assert {o.shape for o in objs} <= {"triangle", "square", "circle", "cross"}
        assert t.scene.grid == (3, 3)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_cma_pairs(condition):
    pairs = cma_pairs(condition, 50, seed=0)
    assert len(pairs) == 50
    for p in pairs:
        c1, c2 = p.clean, p.counterfactual
        assert p.condition == condition and c1.prompt == c2.prompt
        assert c1.mentions == c2.mentions and c1.commas == c2.commas
        assert len(c1.scene.objects) == len(c2.scene.objects) == 2
        a, b = c1.mentioned[0], c1.target
        assert a.color != b.color and a.shape != b.shape and a.cell != b.cell
        assert c1.prompt == f"In this image there is a {a.name} and a"
        assert p.answer == b.name == c1.answer
        assert p.answer.split()[0] != p.answer_star.split()[0]
        if condition == "feature_retrieval":
            b2 = c2.target
            assert c2.mentioned[0] == a and b2.cell == b.cell
            assert b2.color not in (a.color, b.color) and b2.shape not in (a.shape, b.shape)
            assert p.answer_star == b2.name == c2.answer
        else:
            a2, b2 = c2.mentioned[0], c2.target
            assert (a2.color, a2.shape, a2.cell) == (a.color, a.shape, b.cell)
            assert (b2.color, b2.shape, b2.cell) == (b.color, b.shape, a.cell)
            assert p.answer_star == a.name
    assert [p.to_json() for p in pairs] == [p.to_json() for p in cma_pairs(condition, 50, seed=0)]
    assert len({p.clean.prompt for p in pairs}) > 20


def test_cma_id_conditions_share_stimuli_and_errors():
    r, s = cma_pairs("id_retrieval", 5, seed=4), cma_pairs("id_selection", 5, seed=4)
    assert [p.clean.scene for p in r] == [p.clean.scene for p in s]
    with pytest.raises(ValueError, match="unknown CMA condition"):
        cma_pairs("swap", 1)
    with pytest.raises(ValueError, match="3 distinct colours"):
        cma_pairs("feature_retrieval", 1, colors=("red", "blue"))
    three = cma_pairs("feature_retrieval", 20, seed=1, grid=(3, 3), colors=("red", "blue", "green"))
    assert all({o.color for o in p.clean.scene.objects} | {p.counterfactual.target.color}
               == {"red", "blue", "green"} for p in three)
    assert all(set(COLORS) >= {p.answer.split()[0]} and p.answer.split()[1] in SHAPES for p in three)
