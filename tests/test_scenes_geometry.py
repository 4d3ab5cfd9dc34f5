"""Rendering is aligned to the image-token grid: every coloured pixel lies in its own object's tokens."""

import numpy as np
import pytest

from vismech.scenes import COLORS, SHAPES, Geometry, Obj, Scene, render, shape_mask

QWEN = Geometry(28)
LLAVA = Geometry(14, canvas_tokens=24)
WHITE = np.array([255, 255, 255])


def full_scene(grid, shift=0):
    """Every cell filled; colours and shapes cycle so each shape and colour is drawn somewhere."""
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    colors = list(COLORS)
    return Scene(tuple(Obj(colors[(i + shift) % len(colors)], SHAPES[(i + shift) % len(SHAPES)], cell)
                       for i, cell in enumerate(cells)), grid)


@pytest.mark.parametrize("geometry,grid,canvas,obj_px", [
    (QWEN, (2, 2), 280, 56), (QWEN, (3, 3), 392, 56), (LLAVA, (2, 2), 336, 56), (LLAVA, (3, 3), 336, 42),
])
def test_canvas_and_object_sizes(geometry, grid, canvas, obj_px):
    layout = geometry.layout(*grid)
    assert layout.canvas_px == canvas
    img = render(full_scene(grid), layout)
    assert img.size == (canvas, canvas) and img.mode == "RGB"
    for cell in [(r, c) for r in range(grid[0]) for c in range(grid[1])]:
        x0, y0, x1, y1 = layout.cell_box(cell)
        assert (x1 - x0, y1 - y0) == (obj_px, obj_px)


@pytest.mark.parametrize("geometry,grid", [(QWEN, (2, 2)), (QWEN, (3, 3)), (LLAVA, (2, 2)), (LLAVA, (3, 3))])
@pytest.mark.parametrize("shift", [0, 4])
def test_every_pixel_inside_its_objects_tokens(geometry, grid, shift):
    layout = geometry.layout(*grid)
    scene = full_scene(grid, shift)
    px = np.asarray(render(scene, layout))
    p, g = layout.token_px, layout.grid_tokens
    # token index of every pixel, row-major over the g x g token grid
    ys, xs = np.mgrid[0:layout.canvas_px, 0:layout.canvas_px]
    token_of_pixel = (ys // p) * g + xs // p
    owner = np.full(px.shape[:2], -1)
    for i, o in enumerate(scene.objects):
        tokens = layout.cell_tokens(o.cell)
        assert len(tokens) == layout.obj_tokens ** 2
        assert all(0 <= t < g * g for t in tokens)
        inside = np.isin(token_of_pixel, tokens)
        owner[inside] = i
        # the object's pixels are exactly its colour or background, and it draws a substantial part of its box
        region = px[inside]
        is_obj = (region == COLORS[o.color]).all(axis=1)
        assert (is_obj | (region == WHITE).all(axis=1)).all()
        assert is_obj.mean() > 0.3, o
    coloured = ~(px == WHITE).all(axis=2)
    assert coloured.any()
    assert (owner[coloured] >= 0).all(), "a coloured pixel lies outside every object's token block"
    for i, o in enumerate(scene.objects):
        mask = coloured & (owner == i)
        assert (px[mask] == COLORS[o.color]).all()


@pytest.mark.parametrize("geometry,grid", [(QWEN, (2, 2)), (QWEN, (3, 3)), (LLAVA, (2, 2)), (LLAVA, (3, 3))])
def test_cell_tokens_map_back_to_pixel_box(geometry, grid):
    layout = geometry.layout(*grid)
    p, g = layout.token_px, layout.grid_tokens
    for cell in [(r, c) for r in range(grid[0]) for c in range(grid[1])]:
        x0, y0, x1, y1 = layout.cell_box(cell)
        assert 0 <= x0 < x1 <= layout.canvas_px and 0 <= y0 < y1 <= layout.canvas_px
        assert x0 % p == 0 and y0 % p == 0 and x1 % p == 0 and y1 % p == 0
        covered = np.zeros((layout.canvas_px, layout.canvas_px), bool)
        for t in layout.cell_tokens(cell):
            tr, tc = divmod(t, g)
            assert tr < g and tc < g
            covered[tr * p:(tr + 1) * p, tc * p:(tc + 1) * p] = True
        box = np.zeros_like(covered)
        box[y0:y1, x0:x1] = True
        assert (covered == box).all()


def test_objects_are_separated_by_a_free_token_gap():
    layout = QWEN.layout(3, 3)
    a, b = layout.cell_box((0, 0)), layout.cell_box((0, 1))
    assert b[0] - a[2] == 56 and a[0] == 56  # one object size of margin and of gap


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [42, 56])
def test_shapes_fill_their_box_symmetrically(shape, size):
    m = np.asarray(shape_mask(shape, size)) > 0
    assert set(np.unique(np.asarray(shape_mask(shape, size)))) <= {0, 255}  # no anti-aliasing
    rows, cols = np.where(m.any(axis=1))[0], np.where(m.any(axis=0))[0]
    touches_lr = cols[0] == 0 and cols[-1] == size - 1
    touches_tb = rows[0] == 0 and rows[-1] == size - 1
    assert touches_lr or touches_tb
    if shape in ("square", "circle", "diamond", "cross", "triangle", "heart"):
        assert touches_lr and touches_tb
    assert (m == m[:, ::-1]).all()  # exactly left-right mirror symmetric
    expected_fill = {"square": 1.0, "circle": 0.785, "diamond": 0.5, "triangle": 0.5}
    if shape in expected_fill:
        assert m.mean() == pytest.approx(expected_fill[shape], abs=0.04)


def test_render_is_deterministic_and_checks_inputs():
    layout = QWEN.layout(2, 2)
    scene = full_scene((2, 2))
    assert render(scene, layout).tobytes() == render(scene, layout).tobytes()
    with pytest.raises(ValueError, match="valid colours: red"):
        render(Scene((Obj("mauve", "circle", (0, 0)),), (2, 2)), layout)
    with pytest.raises(ValueError, match="valid shapes: circle"):
        render(Scene((Obj("red", "blob", (0, 0)),), (2, 2)), layout)
    with pytest.raises(ValueError, match="3x3"):
        render(Scene((Obj("red", "circle", (0, 0)),), (3, 3)), layout)


def test_background_is_configurable():
    layout = QWEN.layout(2, 2)
    img = np.asarray(render(Scene((), (2, 2)), layout, background=(10, 20, 30)))
    assert (img == [10, 20, 30]).all()


def test_colour_palette_is_well_separated():
    rgb = np.array(list(COLORS.values()), float)
    assert len(COLORS) >= 10 and "white" not in COLORS
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert d.min() >= 80
    assert np.linalg.norm(rgb - 255, axis=-1).min() >= 80
    assert all(name.isalpha() and name.islower() for name in [*COLORS, *SHAPES])
