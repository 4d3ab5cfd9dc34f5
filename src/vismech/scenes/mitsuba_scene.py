"""Physically based rendering of a two-object photoreal scene with Mitsuba 3 (``pip install "vismech[photoreal]"``).

Why Mitsuba 3: it is a wheel on PyPI (mitsuba 3.9.1 + drjit 1.5.0: 68 MB downloaded, 2.4 s to install, 206 MB on
disk, no system libraries) whose ``scalar_rgb`` variant path-traces on any CPU, deterministically for a fixed
sampler seed; Blender's ``bpy`` module is several times larger and pinned to one Python version per release.

The scene: a perspective camera looks down at a floor (about 22 degrees) in front of a backdrop; the two objects
stand on the floor, one left and one right of the image centre. Objects are procedural triangle meshes built here
(``MESHES``: cube, sphere, cylinder, cone, torus; each about 0.9 units tall, smooth normals where the surface is
smooth) with a glossy plastic material (rough plastic, alpha 0.18: no mirror images of the floor, no caustic
fireflies) of the object's colour (the sRGB value of ``vocab.COLORS``, linearised). Three
environments (``ENVIRONMENTS``) differ in floor material, lighting and backdrop: ``studio`` (grey seamless floor and
wall, a large soft area light: soft shadows), ``tiles`` (a checkerboard floor, a warm wall, a smaller area light:
sharper shadows), ``outdoor`` (a sand floor, a blue sky, a low sun: long hard shadows). The path tracer (max depth 5)
gives shading, shadows and inter-reflections; a Gaussian reconstruction filter anti-aliases. Object masks come
from a second pass (Mitsuba's ``aov`` integrator, ``shape_index`` at one sample per pixel, box filter): a pixel
belongs to the object its sample hit.
"""

from __future__ import annotations

import math

import numpy as np

from vismech.errors import UserError

from .vocab import COLORS

ENVIRONMENTS: tuple[str, ...] = ("studio", "tiles", "outdoor")
CAMERA = {"origin": (0.0, 2.3, 5.6), "target": (0.0, 0.45, 0.0), "fov": 40.0}
MAX_DEPTH = 5


def _mitsuba():
    try:
        import mitsuba as mi
    except ImportError:
        raise UserError('photoreal scenes need Mitsuba 3: pip install "vismech[photoreal]" (or pip install '
                         'mitsuba)') from None
    if mi.variant() != "scalar_rgb":
        mi.set_variant("scalar_rgb")
    return mi


# -- meshes: (vertices [V, 3], normals [V, 3], faces [F, 3]) standing on y = 0, centred on the y axis -----------
def _flat(quads: list[list[tuple[float, float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygons with flat normals (each given counter-clockwise seen from outside), fanned into triangles."""
    V, N, F = [], [], []
    for poly in quads:
        p = np.array(poly, float)
        n = np.cross(p[1] - p[0], p[2] - p[0])
        n /= np.linalg.norm(n)
        k = len(V)
        V += list(p)
        N += [n] * len(p)
        F += [[k, k + i, k + i + 1] for i in range(1, len(p) - 1)]
    return np.array(V), np.array(N), np.array(F)


def _join(*parts):
    V, N, F, off = [], [], [], 0
    for v, n, f in parts:
        V.append(v)
        N.append(n)
        F.append(f + off)
        off += len(v)
    return np.concatenate(V), np.concatenate(N), np.concatenate(F)


def _disk(r: float, y: float, up: bool, seg: int):
    a = np.linspace(0, 2 * np.pi, seg, endpoint=False)
    ring = [(r * math.cos(t), y, r * math.sin(t)) for t in a]
    return _flat([ring[::-1] if up else ring])


def _revolve(profile: list[tuple[float, float]], normals: list[tuple[float, float]], seg: int):
    """A surface of revolution about the y axis from (radius, y) profile points and their (nr, ny) normals."""
    a = np.linspace(0, 2 * np.pi, seg + 1)
    V, N = [], []
    for (r, y), (nr, ny) in zip(profile, normals):
        for t in a:
            V.append((r * math.cos(t), y, r * math.sin(t)))
            n = np.array([nr * math.cos(t), ny, nr * math.sin(t)])
            N.append(n / (np.linalg.norm(n) or 1.0))
    F, m = [], seg + 1
    for i in range(len(profile) - 1):
        for j in range(seg):
            a0, a1, b0, b1 = i * m + j, i * m + j + 1, (i + 1) * m + j, (i + 1) * m + j + 1
            F += [[a0, b0, a1], [a1, b0, b1]]
    return np.array(V, float), np.array(N, float), np.array(F)


def cube(s: float = 0.85):
    h = s / 2
    c = [(x, y, z) for x in (-h, h) for y in (0, s) for z in (-h, h)]
    idx = lambda x, y, z: c[(x > 0) * 4 + (y > 0) * 2 + (z > 0)]  # noqa: E731
    faces = [[(-1, 0, 1), (1, 0, 1), (1, 1, 1), (-1, 1, 1)], [(1, 0, -1), (-1, 0, -1), (-1, 1, -1), (1, 1, -1)],
             [(1, 0, 1), (1, 0, -1), (1, 1, -1), (1, 1, 1)], [(-1, 0, -1), (-1, 0, 1), (-1, 1, 1), (-1, 1, -1)],
             [(-1, 1, 1), (1, 1, 1), (1, 1, -1), (-1, 1, -1)], [(-1, 0, -1), (1, 0, -1), (1, 0, 1), (-1, 0, 1)]]
    return _flat([[idx(*v) for v in f] for f in faces])


def sphere(r: float = 0.47, seg: int = 48):
    ts = np.linspace(-np.pi / 2, np.pi / 2, seg // 2 + 1)
    return _revolve([(r * math.cos(t), r + r * math.sin(t)) for t in ts], [(math.cos(t), math.sin(t)) for t in ts],
                    seg)


def cylinder(r: float = 0.4, h: float = 0.9, seg: int = 48):
    return _join(_revolve([(r, 0.0), (r, h)], [(1, 0), (1, 0)], seg), _disk(r, h, True, seg), _disk(r, 0, False, seg))


def cone(r: float = 0.48, h: float = 1.0, seg: int = 48):
    k = r / h
    side = _revolve([(r, 0.0), (1e-4, h)], [(1, k), (1, k)], seg)
    return _join(side, _disk(r, 0, False, seg))


def torus(R: float = 0.33, r: float = 0.14, seg: int = 48, tilt: float = 65.0):
    """A ring standing tilted towards the camera, so its hole is seen."""
    u = np.linspace(0, 2 * np.pi, seg + 1)
    v = np.linspace(0, 2 * np.pi, seg // 2 + 1)
    V, N = [], []
    for a in u:
        for b in v:
            c = np.array([math.cos(a), 0, math.sin(a)])
            V.append(c * (R + r * math.cos(b)) + np.array([0, r * math.sin(b), 0]))
            N.append(c * math.cos(b) + np.array([0, math.sin(b), 0]))
    m = len(v)
    F = []
    for i in range(seg):
        for j in range(len(v) - 1):
            a0, a1, b0, b1 = i * m + j, i * m + j + 1, (i + 1) * m + j, (i + 1) * m + j + 1
            F += [[a0, a1, b0], [a1, b1, b0]]
    V, N = np.array(V), np.array(N)
    t = math.radians(tilt)
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    V, N = V @ rot.T, N @ rot.T
    V[:, 1] -= V[:, 1].min()
    return V, N, np.array(F)


MESHES = {"cube": cube, "sphere": sphere, "cylinder": cylinder, "cone": cone, "torus": torus}


def _linear(rgb: tuple[int, int, int]) -> list[float]:
    """sRGB 0-255 to linear reflectance (clamped away from 0 and 1 so every colour still shades)."""
    out = []
    for c in rgb:
        x = c / 255.0
        x = x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4
        out.append(min(0.85, max(0.02, x)))
    return out


def _placed(shape: str, x: float, z: float, yaw: float, scale: float) -> np.ndarray:
    V, N, F = MESHES[shape]()
    t = math.radians(yaw)
    rot = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    return (V @ rot.T) * scale + np.array([x, 0, z]), N @ rot.T, F


def _mesh(mi, name: str, shape: str, color: str, x: float, z: float, yaw: float, scale: float):
    V, N, F = _placed(shape, x, z, yaw, scale)
    props = mi.Properties()
    props["bsdf"] = mi.load_dict({"type": "roughplastic", "diffuse_reflectance": {"type": "rgb",
                                                                                  "value": _linear(COLORS[color])},
                                  "alpha": 0.18, "int_ior": 1.5})
    mesh = mi.Mesh(name, len(V), len(F), has_vertex_normals=True, props=props)
    p = mi.traverse(mesh)
    p["vertex_positions"] = np.asarray(V, np.float32).ravel().tolist()
    p["vertex_normals"] = np.asarray(N, np.float32).ravel().tolist()
    p["faces"] = np.asarray(F, np.uint32).ravel().tolist()
    p.update()
    return mesh


def _rgb(v) -> dict:
    return {"type": "rgb", "value": list(v)}


def _environment(mi, name: str) -> dict:
    T = mi.ScalarTransform4f
    floor = lambda bsdf: {"type": "rectangle", "to_world": T().rotate([1, 0, 0], -90).scale(30), "bsdf": bsdf}  # noqa
    wall = lambda rgb: {"type": "rectangle", "to_world": T().translate([0, 0, -4.5]).scale(30),  # noqa: E731
                        "bsdf": {"type": "diffuse", "reflectance": _rgb(rgb)}}
    if name == "studio":
        return {"floor": floor({"type": "diffuse", "reflectance": _rgb((0.45, 0.45, 0.47))}),
                "wall": wall((0.45, 0.46, 0.5)),
                "key": {"type": "rectangle", "to_world": T().look_at(origin=[-2.5, 5.5, 3.5], target=[0, 0, 0],
                                                                     up=[0, 1, 0]).scale(0.9),
                        "emitter": {"type": "area", "radiance": _rgb((40, 40, 40))}},
                "fill": {"type": "constant", "radiance": _rgb((0.25, 0.25, 0.27))}}
    if name == "tiles":
        checker = {"type": "checkerboard", "color0": _rgb((0.08, 0.08, 0.09)), "color1": _rgb((0.55, 0.55, 0.52)),
                   "to_uv": T().scale([24, 24, 1])}
        return {"floor": floor({"type": "diffuse", "reflectance": checker}),
                "wall": wall((0.55, 0.42, 0.3)),
                "key": {"type": "rectangle", "to_world": T().look_at(origin=[3.0, 6.0, 2.5], target=[0, 0, 0],
                                                                     up=[0, 1, 0]).scale(0.6),
                        "emitter": {"type": "area", "radiance": _rgb((90, 80, 66))}},
                "fill": {"type": "constant", "radiance": _rgb((0.12, 0.12, 0.14))}}
    if name == "outdoor":
        return {"floor": floor({"type": "diffuse", "reflectance": _rgb((0.62, 0.5, 0.33))}),
                "sun": {"type": "directional", "direction": [0.75, -0.45, -0.45], "irradiance": _rgb((3.2, 3.0, 2.6))},
                "sky": {"type": "constant", "radiance": _rgb((0.32, 0.45, 0.7))}}
    raise UserError(f"unknown environment {name!r}; environments are {', '.join(ENVIRONMENTS)}")


def build(spec: dict, size: int, spp: int, seed: int, rfilter: str = "gaussian"):
    """The Mitsuba scene of ``spec`` (``photoreal.PhotoScene.to_json()``) at ``size`` x ``size`` pixels."""
    mi = _mitsuba()
    T = mi.ScalarTransform4f
    cam = spec["camera"]
    d = {"type": "scene", "integrator": {"type": "path", "max_depth": MAX_DEPTH},
         "sensor": {"type": "perspective", "fov": cam["fov"],
                    "to_world": T().look_at(origin=cam["origin"], target=cam["target"], up=[0, 1, 0]),
                    "film": {"type": "hdrfilm", "width": size, "height": size, "rfilter": {"type": rfilter},
                             "pixel_format": "rgb"},
                    "sampler": {"type": "independent", "sample_count": spp, "seed": seed}},
         **_environment(mi, spec["environment"])}
    for i, o in enumerate(spec["objects"]):
        d[f"obj{i}"] = _mesh(mi, f"obj{i}", o["shape"], o["color"], o["x"], o["z"], o["yaw"], o["scale"])
    return mi.load_dict(d)


def render(spec: dict, size: int, spp: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(RGB uint8 [size, size, 3], one bool mask [size, size] per object of ``spec``)."""
    mi = _mitsuba()
    img = mi.render(build(spec, size, spp, seed), spp=spp, seed=seed)
    bmp = mi.Bitmap(img).convert(mi.Bitmap.PixelFormat.RGB, mi.Struct.Type.UInt8, srgb_gamma=True)
    rgb = np.array(bmp).reshape(size, size, 3)
    scene = build(spec, size, 1, seed, rfilter="box")  # one sample per pixel, no filtering: exact shape indices
    aov = mi.load_dict({"type": "aov", "aovs": "index:shape_index"})
    index = np.array(mi.render(scene, integrator=aov, spp=1, seed=seed)).reshape(size, size, -1)[..., -1]
    ids = [s.id() for s in scene.shapes()]  # shape_index is 0 where nothing is hit, else 1 + the shape's index
    masks = [np.abs(index - 1 - ids.index(f"obj{i}")) < 0.01 for i in range(len(spec["objects"]))]
    return rgb, masks
