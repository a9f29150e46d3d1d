"""Generate an offline V-IRL world once (like nanoGPT's data/*/prepare.py): a procedural city in the official files.
Leaves out the environment: envs.NavigationEnv reads the files; envs.py runs this file on first use, never imports it.
Details: docs/virl_env.md, "The generated world".

    python make_virl_world.py --world nyc --seed 0                # -> $SFTVSRL_CACHE/virl/nyc_seed0_v2/ (training city)
    python make_virl_world.py --world vln_mini                    # the VLN-mini analogue: 9 city skins x 2 routes
    python make_virl_world.py --world london --out /tmp/london    # any folder

A world is route_infos.json (training routes), route_infos_heldout.json, gps_pano_mapping.pkl and street_views/: the
layout of the official nyc_1k_routes/, read through the loaders envs.py uses for the official data. The output is
byte-for-byte deterministic in (world, seed); it is written to a temporary folder that is renamed when complete.
"""
import argparse
import json
import math
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from envs import (EARTH_RADIUS_M, VIRL_DIRECTIONS_ABS, VIRL_VLN_MINI_SKINS, _font,
                  virl_view_headings, virl_world_dir, virl_world_files)

VIRL_CATEGORIES = ["Hotel", "Cafe", "Bank", "Pharmacy", "Bookstore", "Bakery", "Museum", "Pizzeria", "Gym", "Florist",
                   "Deli", "Bar", "Library", "Theater", "Market", "Barber"]
VIRL_SKINS = {
    # name: origin (lat, lng), grid rotation, sky top/horizon, road, palette (facades), windows, window cell (w, h),
    #       sign colours, name stems, "stem category" or "category stem" order
    "nyc": dict(origin=(40.7420, -73.9890), rot=22.0, sky=((92, 140, 205), (190, 215, 240)), road=(70, 70, 74),
                palette=[(150, 75, 55), (170, 95, 70), (120, 60, 45), (185, 160, 130), (100, 100, 110)],
                window=(40, 50, 70), cell=(6, 8), signs=[(200, 30, 40), (30, 60, 160), (250, 200, 40), (20, 120, 60)],
                stems=["Hudson", "Bleecker", "Empire", "Gramercy", "Chelsea", "Bowery", "Astor", "Lenox", "Tribeca",
                       "Delancey", "Madison", "Union", "Fulton", "Mercer", "Nolita", "Harlem", "Carnegie", "Orchard",
                       "Greene", "Spring"], order="stem"),
    "milan": dict(origin=(45.4642, 9.1900), rot=24.0, sky=((120, 160, 210), (220, 230, 240)), road=(95, 90, 85),
                  palette=[(220, 180, 120), (200, 120, 80), (235, 210, 170), (190, 150, 100)], window=(90, 60, 40),
                  cell=(8, 12), signs=[(0, 120, 80), (180, 20, 30), (240, 240, 230), (60, 60, 60)],
                  stems=["Duomo", "Brera", "Navigli", "Sforza", "Scala", "Ticinese", "Porta Nuova", "Isola", "Solari",
                         "Magenta", "Manzoni", "Verdi", "Torino", "Dante", "Cairoli", "Garibaldi"], order="category"),
    "new_delhi": dict(origin=(28.6139, 77.2090), rot=21.0, sky=((170, 170, 160), (225, 215, 195)), road=(110, 100, 90),
                      palette=[(230, 200, 150), (200, 90, 60), (240, 230, 210), (120, 160, 150)], window=(70, 50, 40),
                      cell=(10, 10), signs=[(250, 120, 20), (20, 100, 180), (200, 20, 120), (255, 230, 0)],
                      stems=["Connaught", "Janpath", "Chandni", "Lodhi", "Hauz Khas", "Karol", "Saket", "Khan",
                             "Paharganj", "Rajpath", "Lajpat", "Defence", "Nizamuddin", "Moti", "Kamla", "Sunder"],
                      order="stem"),
    "buenos_aires": dict(origin=(-34.6037, -58.3816), rot=23.0, sky=((80, 150, 220), (200, 225, 245)),
                         road=(85, 85, 90), palette=[(240, 235, 220), (200, 200, 190), (170, 120, 160),
                                                     (110, 140, 190)], window=(30, 30, 40), cell=(7, 14),
                         signs=[(100, 180, 230), (230, 230, 230), (150, 30, 30), (30, 30, 30)],
                         stems=["Palermo", "Recoleta", "San Telmo", "Boca", "Belgrano", "Retiro", "Florida",
                                "Corrientes", "Lavalle", "Almagro", "Caballito", "Mayo", "Defensa", "Tucuman",
                                "Alvear", "Dorrego"],
                         order="category"),
    "london": dict(origin=(51.5074, -0.1278), rot=22.5, sky=((150, 160, 170), (205, 210, 215)), road=(60, 62, 66),
                   palette=[(160, 70, 50), (230, 225, 210), (90, 90, 95), (140, 110, 80)], window=(250, 250, 240),
                   cell=(5, 9), signs=[(200, 16, 46), (0, 36, 125), (0, 100, 60), (20, 20, 20)],
                   stems=["Camden", "Soho", "Mayfair", "Chelsea Green", "Holborn", "Covent", "Strand", "Baker",
                          "Piccadilly", "Fleet", "Kensington", "Bloomsbury", "Marylebone", "Borough", "Angel",
                          "Temple"],
                   order="stem"),
    "hong_kong": dict(origin=(22.2819, 114.1582), rot=20.5, sky=((110, 150, 190), (210, 220, 230)), road=(55, 55, 60),
                      palette=[(200, 200, 205), (160, 190, 200), (220, 210, 190), (120, 130, 140)],
                      window=(60, 90, 110), cell=(4, 5), signs=[(230, 0, 40), (255, 200, 0), (0, 170, 90),
                                                                 (255, 100, 180)],
                      stems=["Kowloon", "Wan Chai", "Mong Kok", "Central", "Sheung Wan", "Causeway", "Jordan",
                             "Tsim Sha", "Admiralty", "Happy Valley", "Sai Ying", "Yau Ma", "Lan Kwai", "Stanley",
                             "Aberdeen", "Peak"],
                      order="stem"),
    "melbourne": dict(origin=(-37.8136, 144.9631), rot=23.5, sky=((100, 170, 230), (210, 235, 250)), road=(75, 78, 80),
                      palette=[(190, 120, 90), (100, 110, 120), (210, 190, 160), (70, 90, 80)], window=(30, 40, 50),
                      cell=(9, 9), signs=[(0, 90, 170), (250, 190, 0), (120, 40, 120), (230, 80, 30)],
                      stems=["Flinders", "Collins", "Bourke", "Swanston", "Fitzroy", "Carlton", "Southbank",
                             "Docklands", "Lygon", "Degraves", "Hosier", "Elizabeth", "Spencer", "Lonsdale",
                             "Exhibition", "Russell"],
                      order="category"),
    "lagos": dict(origin=(6.5244, 3.3792), rot=21.5, sky=((140, 180, 215), (230, 235, 230)), road=(120, 105, 90),
                  palette=[(240, 220, 100), (90, 160, 90), (230, 140, 70), (200, 200, 200)], window=(50, 40, 30),
                  cell=(12, 9), signs=[(0, 135, 80), (250, 250, 250), (220, 60, 30), (40, 40, 160)],
                  stems=["Ikeja", "Lekki", "Yaba", "Surulere", "Victoria", "Ikoyi", "Marina", "Apapa", "Ebute",
                         "Obalende", "Oshodi", "Ajah", "Festac", "Agege", "Onikan", "Broad"], order="stem"),
    "san_francisco": dict(origin=(37.7749, -122.4194), rot=23.0, sky=((150, 190, 225), (235, 240, 245)),
                          road=(80, 82, 85), palette=[(230, 200, 210), (170, 210, 220), (240, 230, 190),
                                                      (200, 150, 120)], window=(40, 60, 80), cell=(6, 12),
                          signs=[(190, 50, 30), (40, 110, 170), (250, 160, 30), (90, 50, 130)],
                          stems=["Mission", "Castro", "Haight", "Nob Hill", "Presidio", "Embarcadero", "Marina Bay",
                                 "Sunset", "Richmond", "Dogpatch", "Noe", "Potrero", "Tenderloin", "Russian Hill",
                                 "Sutter", "Valencia"], order="category"),
}
# the VLN-mini analogue (visual OOD): 2 routes in each of 9 cities, fixed order; "nyc" here is a different city
# layout (other seed) with held-out routes, as VLN mini also contains New York routes
VIRL_WORLDS = {  # name -> generate_virl_world kwargs
    **{sk: dict(skin=sk, num_routes=300, num_heldout_routes=60) for sk in VIRL_SKINS},
    "vln_mini": dict(skin=VIRL_VLN_MINI_SKINS, num_routes=18, num_heldout_routes=0, grid_size=5),
}


# ---------------------------------------------------------------------------------------------------------------
# Landmark signs: a shop's logo, large enough for the default VL model's 256 px input
# ---------------------------------------------------------------------------------------------------------------
# A sign shows the landmark's category as a pictogram and its name stem as a 2-letter monogram, both large, over the
# full name in small text (world v2). The v1 signs held only the name, in 6-9 px letters at the model's input: a
# vision tower trained from scratch did not learn to read them (docs/models.md), as a pretrained VLM would.
VIRL_READ_M = 30.0  # metres: signs farther away are not drawn; the vision stage names every drawn sign
# sign size in metres (above eye level), at its distance; world v3: 1.4x v2's (6.0, 1.5, 8.0), a monogram letter ~1.4
# 16-px patches tall at the 256 px input (docs/models.md: the tower read 1.8x the stems of 1x signs)
VIRL_SIGN_M = dict(half_width=8.4, bottom=1.5, top=10.6)
VIRL_PANO_SIZE = (512, 256)  # the generated worlds' panoramas (W, H)


def virl_monograms(stems) -> dict:
    """Each stem's logo letters: its first letter and the first later one that no earlier stem took (else any free
    second letter), so that a monogram names one stem in every city, like a chain's logo."""
    out, taken = {}, set()
    for stem in stems:
        w = stem.replace(" ", "").upper()
        out[stem] = next(w[0] + c for c in [*w[1:], *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"] if w[0] + c not in taken)
        taken.add(out[stem])
    return out


VIRL_MONOGRAMS = virl_monograms([stem for s in VIRL_SKINS.values() for stem in s["stems"]])  # stem -> 2 letters


def virl_name_parts(name: str) -> tuple[str, str]:
    """(stem, category) of a landmark name: 'Hudson Cafe' and 'Cafe Duomo' -> ('Hudson', 'Cafe'), ('Duomo', 'Cafe')."""
    words = name.split()
    if words[-1] in VIRL_CATEGORIES:
        return " ".join(words[:-1]), words[-1]
    return " ".join(words[1:]), words[0]


def draw_pictogram(draw: ImageDraw.ImageDraw, k: int, box: tuple, fill):
    """Category k's icon (one of 16 simple shapes) in the square box (x, y, size)."""
    x, y, s = box
    c, r, lw = (x + s / 2, y + s / 2), s / 2, max(1, int(s / 6))

    def ngon(n, turn=0.0, radius=r):
        angles = [turn + 2 * math.pi * i / n for i in range(n)]
        return [(c[0] + radius * math.sin(a), c[1] - radius * math.cos(a)) for a in angles]
    shapes = [
        lambda: draw.ellipse([x, y, x + s, y + s], fill=fill),
        lambda: draw.rectangle([x, y, x + s, y + s], fill=fill),
        lambda: draw.polygon(ngon(3), fill=fill),
        lambda: draw.polygon(ngon(3, math.pi), fill=fill),
        lambda: draw.polygon(ngon(4), fill=fill),
        lambda: (draw.rectangle([x + s / 3, y, x + 2 * s / 3, y + s], fill=fill),
                 draw.rectangle([x, y + s / 3, x + s, y + 2 * s / 3], fill=fill)),
        lambda: (draw.line([x, y, x + s, y + s], fill=fill, width=lw + 1),
                 draw.line([x, y + s, x + s, y], fill=fill, width=lw + 1)),
        lambda: draw.ellipse([x, y, x + s, y + s], outline=fill, width=lw),
        lambda: draw.rectangle([x, y, x + s, y + s], outline=fill, width=lw),
        lambda: draw.polygon([p for pair in zip(ngon(5), ngon(5, math.pi / 5, r * 0.45)) for p in pair], fill=fill),
        lambda: [draw.rectangle([x, y + i * s * 0.4, x + s, y + i * s * 0.4 + s / 5], fill=fill) for i in range(3)],
        lambda: [draw.rectangle([x + i * s * 0.4, y, x + i * s * 0.4 + s / 5, y + s], fill=fill) for i in range(3)],
        lambda: draw.pieslice([x, y, x + s, y + 2 * s], 180, 360, fill=fill),
        lambda: draw.polygon(ngon(6), fill=fill),
        lambda: (draw.ellipse([x, y + s / 4, x + s / 2, y + 3 * s / 4], fill=fill),
                 draw.ellipse([x + s / 2, y + s / 4, x + s, y + 3 * s / 4], fill=fill)),
        lambda: draw.polygon([(x, y), (x + s, y + s / 2), (x, y + s)], outline=fill, width=lw),
    ]
    shapes[k]()


def sign_layout(stem: str, w: float, h: float) -> dict:
    """Where draw_sign puts the parts of a w x h sign of `stem`, from its top-left corner: the pictogram's box (x, y,
    size), the monogram's left-middle anchor and centre x, their font sizes."""
    s = min(0.62 * h, 0.4 * w)
    size, mx = max(6, int(s * 1.15)), 0.12 * w + s
    return dict(pictogram=(0.06 * w, 0.08 * h, s), monogram=(mx, 0.08 * h + s / 2), monogram_size=size,
                monogram_cx=mx + _font(size).getlength(VIRL_MONOGRAMS[stem]) / 2, name_size=max(5, int(0.22 * h)))


def draw_sign(draw: ImageDraw.ImageDraw, name: str, colour, box: tuple):
    """A landmark's sign in box (x0, y0, x1, y1): the category's pictogram left, the stem's monogram right (both
    ~60 % of the sign's height), the full name small along the bottom (sign_layout)."""
    x0, y0, x1, y1 = box
    stem, category = virl_name_parts(name)
    ink = (0, 0, 0) if sum(colour) > 400 else (255, 255, 255)
    h, w = y1 - y0, x1 - x0
    at = sign_layout(stem, w, h)
    px, py, s = at["pictogram"]
    draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
    draw_pictogram(draw, VIRL_CATEGORIES.index(category), (x0 + px, y0 + py, s), ink)
    draw.text((x0 + at["monogram"][0], y0 + at["monogram"][1]), VIRL_MONOGRAMS[stem], fill=ink,
              font=_font(at["monogram_size"]), anchor="lm")
    draw.text((x0 + 0.06 * w, y1 - 0.04 * h), name, fill=ink, font=_font(at["name_size"]), anchor="ls")


# ---------------------------------------------------------------------------------------------------------------
# Words of the milestone blocks and the panorama convention
# ---------------------------------------------------------------------------------------------------------------
def virl_compass_word(heading: float) -> str:
    return VIRL_DIRECTIONS_ABS[int(((heading % 360) + 22.5) // 45) % 8]


def virl_spatial_word(heading: float, bearing_to_landmark: float) -> str:
    """Where a landmark lies for an agent facing `heading`: front, right front, right, right behind, behind, ..."""
    rel = (bearing_to_landmark - heading + 540) % 360 - 180
    side, a = ("right" if rel > 0 else "left"), abs(rel)
    if a <= 22.5:
        return "front"
    if a >= 157.5:
        return "behind"
    if 67.5 <= a <= 112.5:
        return side
    return f"{side} front" if a < 67.5 else f"{side} behind"


def virl_pano_column_heading(theta, rotation):
    """World compass heading seen at pano yaw `theta` (degrees, 0..360 across the image width, left to right).
    Inverse of the official camera heading ((h - 180) mod 360 + rotation) mod 360."""
    return (np.asarray(theta) - rotation + 180) % 360


# ---------------------------------------------------------------------------------------------------------------
# The city, its routes and the files
# ---------------------------------------------------------------------------------------------------------------
class _VirlCity:
    """A jittered, rotated street grid (nodes, edges, panorama points, corner landmarks) in local metres."""

    def __init__(self, skin: str, rng: random.Random, grid_size: int, block_m: float, points_per_block: int,
                 landmark_prob: float, city_idx: int = 0):
        self.skin, self.s, self.G, self.block = skin, VIRL_SKINS[skin], grid_size, block_m
        lat0, lng0 = self.s["origin"]
        self.lat0, self.lng0 = lat0 + 0.01 * city_idx, lng0  # a second city of the same skin sits ~1 km north
        self.rot = math.radians(self.s["rot"])
        self.nodes = {}
        for i in range(grid_size):
            for j in range(grid_size):
                gx, gy = i * block_m + rng.uniform(-3, 3), j * block_m + rng.uniform(-3, 3)
                self.nodes[(i, j)] = self._rotate(gx, gy)
        self.edges = [((i, j), (i + di, j + dj)) for i in range(grid_size) for j in range(grid_size)
                      for di, dj in ((1, 0), (0, 1)) if i + di < grid_size and j + dj < grid_size]
        self.points = [(self.nodes[n], "node", n) for n in self.nodes]  # (xy, kind, key)
        for a, b in self.edges:
            for k in range(1, points_per_block + 1):
                f = k / (points_per_block + 1)
                xy = tuple(self.nodes[a][t] * (1 - f) + self.nodes[b][t] * f for t in range(2))
                self.points.append((xy, "edge", (a, b)))
        names = [f"{st} {c}" if self.s["order"] == "stem" else f"{c} {st}" for st in self.s["stems"]
                 for c in VIRL_CATEGORIES]
        rng.shuffle(names)
        self._names = names
        self.landmarks = []  # dict(name, xy, node, colour)
        for n in sorted(self.nodes):
            for q in range(4):
                if rng.random() < landmark_prob:
                    self.add_landmark(n, q, rng)

    def _rotate(self, gx, gy):
        c, s = math.cos(self.rot), math.sin(self.rot)  # compass rotation: grid +y (north) turns clockwise by rot
        return (gx * c + gy * s, -gx * s + gy * c)

    def add_landmark(self, node, quadrant, rng):
        if not self._names:
            return None
        bearing = math.degrees(self.rot) + 45 + 90 * quadrant  # corner between two streets
        x0, y0 = self.nodes[node]
        r = 14.0
        xy = (x0 + r * math.sin(math.radians(bearing)), y0 + r * math.cos(math.radians(bearing)))
        name = self._names.pop()
        lm = {"name": name, "xy": xy, "node": node, "colour": rng.choice(self.s["signs"])}
        self.landmarks.append(lm)
        return lm

    def latlng(self, xy):
        lat = self.lat0 + math.degrees(xy[1] / EARTH_RADIUS_M)
        lng = self.lng0 + math.degrees(xy[0] / (EARTH_RADIUS_M * math.cos(math.radians(self.lat0))))
        return (round(lat, 7), round(lng, 7))

    def neighbours(self, n):
        i, j = n
        return [m for m in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)) if m in self.nodes]

    def street_bearings(self, kind, key):
        def brg(a, b):
            return math.degrees(math.atan2(b[0] - a[0], b[1] - a[1])) % 360
        if kind == "node":
            return [brg(self.nodes[key], self.nodes[m]) for m in self.neighbours(key)]
        a, b = key
        return [brg(self.nodes[a], self.nodes[b]), brg(self.nodes[b], self.nodes[a])]

    def render(self, xy, kind, key, size, rotation) -> Image.Image:
        """Equirectangular panorama at xy: sky, facades with windows (colour per block), road with centre lines
        along the street directions, and a sign (draw_sign) for every landmark within VIRL_READ_M, at its true
        bearing."""
        W, H = size
        s = self.s
        theta = (np.arange(W) + 0.5) / W * 360
        heading = virl_pano_column_heading(theta, rotation)                       # (W,)
        elev = 90 - (np.arange(H) + 0.5) / H * 180                                # (H,)
        streets = np.array(self.street_bearings(kind, key))
        d = np.abs((heading[:, None] - streets[None, :] + 180) % 360 - 180).min(axis=1)  # (W,)
        img = np.empty((H, W, 3), np.float32)
        t = np.clip(elev / 90, 0, 1)[:, None, None]
        img[:] = (1 - t) * np.array(s["sky"][1], np.float32) + t * np.array(s["sky"][0], np.float32)
        ground = np.broadcast_to((elev < -4)[:, None], (H, W))
        img[ground] = s["road"]
        # facade colour per block: look 25 m towards the column, grid cell of that point
        c, sn = math.cos(-self.rot), math.sin(-self.rot)
        px = xy[0] + 25 * np.sin(np.radians(heading))
        py = xy[1] + 25 * np.cos(np.radians(heading))
        gx, gy = px * c + py * sn, -px * sn + py * c
        cell = (np.floor(gx / self.block) * 7 + np.floor(gy / self.block) * 13).astype(np.int64)
        palette = np.array(s["palette"], np.float32)
        facade_rgb = palette[cell % len(palette)]                                 # (W, 3)
        top = np.where(d < 14, 6.0, 28.0 + 8.0 * ((cell % 3) - 1))                # open street vs facade
        facade = (elev[:, None] > -4) & (elev[:, None] < top[None, :])            # (H, W)
        img[facade] = np.broadcast_to(facade_rgb[None, :, :], (H, W, 3))[facade]
        cw, ch = s["cell"]
        cols, rows = np.arange(W) // cw % 2 == 1, np.arange(H) // ch % 2 == 1
        win = facade & rows[:, None] & cols[None, :] & (d >= 14)[None, :] & (elev[:, None] > 0)
        img[win] = s["window"]
        lane = ground & (d < 1.5)[None, :] & ((np.arange(H) // 4) % 2 == 0)[:, None]
        img[lane] = (235, 220, 120)
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for lm in self.landmarks:
            dx, dy = lm["xy"][0] - xy[0], lm["xy"][1] - xy[1]
            r = math.hypot(dx, dy)
            if r > VIRL_READ_M or r < 1:
                continue
            b = math.degrees(math.atan2(dx, dy)) % 360
            half, top_e, bot_e = sign_angles(r)
            cx = ((b - 180) % 360 + rotation) % 360 / 360 * W
            x0, x1 = cx - half / 360 * W, cx + half / 360 * W
            y0, y1 = (90 - top_e) / 180 * H, (90 - bot_e) / 180 * H
            for off in (-W, 0, W):  # signs that straddle the seam are drawn on both sides
                draw_sign(draw, lm["name"], lm["colour"], (x0 + off, y0, x1 + off, y1))
        return im


def sign_angles(r: float) -> tuple[float, float, float]:
    """A sign at r metres in a panorama, in degrees: its half width, the elevations of its top and bottom edges."""
    half = min(40.0, math.degrees(math.atan2(VIRL_SIGN_M["half_width"], r)))
    return (half, *(math.degrees(math.atan2(VIRL_SIGN_M[k], r)) for k in ("top", "bottom")))


def virl_readable_signs(city: _VirlCity, xy, heading: float, read_m: float = VIRL_READ_M,
                        pano_size: tuple = VIRL_PANO_SIZE) -> list[dict]:
    """The landmark signs a 2x2 view grid (envs.virl_view_grid at `heading`) shows: those within `read_m` metres (all
    that the panorama draws), in grid order (tile 0..3 = views at heading -135, -45, +45, +135; left to right in a
    tile).
    Each: name, tile, and in the tile's units (-1 left edge .. 1 right edge; pinhole, FOV 90) x of the sign's
    centre, pictogram_x and monogram_x of the centres of its pictogram and monogram on a panorama of pano_size
    (W, H). The vision pre-training stage's labels."""
    signs, views = [], virl_view_headings(heading)
    for lm in city.landmarks:
        dx, dy = lm["xy"][0] - xy[0], lm["xy"][1] - xy[1]
        r = math.hypot(dx, dy)
        if not 1 <= r <= read_m:
            continue
        off = [(math.degrees(math.atan2(dx, dy)) - v + 180) % 360 - 180 for v in views]  # from each view's centre
        tile = min(range(4), key=lambda i: abs(off[i]))
        half, top_e, bot_e = sign_angles(r)
        w, h = 2 * half / 360 * pano_size[0], (top_e - bot_e) / 180 * pano_size[1]  # the drawn sign, pano px
        at = sign_layout(virl_name_parts(lm["name"])[0], w, h)
        x_at = lambda px: math.tan(math.radians(max(-89.0, min(89.0, off[tile] - half + 2 * half * px / w))))
        signs.append({"name": lm["name"], "tile": tile, "x": x_at(w / 2),
                      "pictogram_x": x_at(at["pictogram"][0] + at["pictogram"][2] / 2),
                      "monogram_x": x_at(at["monogram_cx"])})
    return sorted(signs, key=lambda s: (s["tile"], s["x"]))


def _virl_make_routes(city: _VirlCity, rng: random.Random, count: int, taken: set, pair_taken: set):
    """Routes of 2..4 legs of 1..3 blocks with 90-degree turns, no node visited twice, ending at a node with a
    landmark (one is added if needed). `taken`: node sequences in use; `pair_taken`: (start, dest) pairs in use."""
    routes, tries = [], 0
    while len(routes) < count:
        tries += 1
        if tries > 200000:
            raise RuntimeError(f"could not make {count} distinct routes on a {city.G}x{city.G} grid; enlarge it")
        start = rng.choice(sorted(city.nodes))
        di, dj = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
        path, anchors, ok = [start], [start], True
        for leg in range(rng.randint(2, 4)):
            if leg > 0:
                di, dj = rng.choice([(dj, -di), (-dj, di)])  # turn right or left
            for _ in range(rng.randint(1, 3)):
                nxt = (path[-1][0] + di, path[-1][1] + dj)
                if nxt not in city.nodes or nxt in path:
                    ok = False
                    break
                path.append(nxt)
            if not ok:
                break
            anchors.append(path[-1])
        if not ok or tuple(path) in taken or (start, path[-1]) in pair_taken:
            continue
        taken.add(tuple(path))
        pair_taken.add((start, path[-1]))
        routes.append(anchors)
    return routes


def _virl_route_dict(city: _VirlCity, anchors, rng: random.Random, route_id: str) -> dict:
    def near(node):
        lms = [lm for lm in city.landmarks if lm["node"] == node]
        return min(lms, key=lambda lm: lm["name"]) if lms else None

    dest_lm = near(anchors[-1])
    if dest_lm is None:
        dest_lm = city.add_landmark(anchors[-1], rng.randrange(4), rng)
    blocks, landmark_list = [], []
    for k in range(1, len(anchors)):
        a, b = city.nodes[anchors[k - 1]], city.nodes[anchors[k]]
        heading = round(math.degrees(math.atan2(b[0] - a[0], b[1] - a[1]))) % 360
        lm = dest_lm if k == len(anchors) - 1 else near(anchors[k])
        lines = [f"    intersection_id: {k}"]
        if lm is not None:
            lm_brg = math.degrees(math.atan2(lm["xy"][0] - b[0], lm["xy"][1] - b[1])) % 360
            lines.append(f"    landmarks: {lm['name']} is on your {virl_spatial_word(heading, lm_brg)}")
        lines.append(f"    to_next_intersection_heading: {heading} ({virl_compass_word(heading)})")
        blocks.append("{\n" + "\n".join(lines) + "\n}")
        landmark_list.append(None if lm is None else {"name": lm["name"], "geocode": list(city.latlng(lm["xy"]))})
    start = list(city.latlng(city.nodes[anchors[0]]))
    return {"route_id": route_id,
            "start_place": {"name": f"start of {route_id}", "geocode": start, "relocated_geocode": start},
            "dest_place": {"name": dest_lm["name"], "geocode": list(city.latlng(dest_lm["xy"]))},
            "route_results": {"geocode_list": [list(city.latlng(city.nodes[n])) for n in anchors[1:]],
                              "landmark_list": landmark_list},
            "milestone_info": "\n".join(blocks)}


def generate_virl_world(out_dir, num_routes: int = 300, num_heldout_routes: int = 60, seed: int = 0,
                        skin="nyc", grid_size: int = 8, block_m: float = 70.0, points_per_block: int = 3,
                        landmark_prob: float = 0.3, pano_size=VIRL_PANO_SIZE) -> dict:
    """Write a procedural V-IRL world in the official format: route_infos.json (training routes),
    route_infos_heldout.json (routes with (start, destination) pairs and paths disjoint from training),
    gps_pano_mapping.pkl and street_views/{pano_id}.jpg + .metadata.json. `skin` is one city skin or a list of skins
    (one city each, `num_routes` split evenly in that order, e.g. VIRL_VLN_MINI_SKINS with 18 routes).
    Deterministic in (seed, skin, sizes). Returns the dict of the four paths."""
    skins = [skin] if isinstance(skin, str) else list(skin)
    for sk in skins:
        if sk not in VIRL_SKINS:
            raise ValueError(f"unknown V-IRL city skin {sk!r}; choose from {sorted(VIRL_SKINS)}")
    if len(skins) > 1 and num_routes % len(skins):
        raise ValueError(f"num_routes={num_routes} must be a multiple of the {len(skins)} skins")
    out = Path(out_dir)
    views = out / "street_views"
    views.mkdir(parents=True, exist_ok=True)
    mapping, train, heldout = {}, [], []
    for ci, sk in enumerate(skins):
        rng = random.Random(f"virl-world-v1:{seed}:{ci}:{sk}:{len(skins)}")  # v2 redrew only the signs
        city = _VirlCity(sk, rng, grid_size, block_m, points_per_block, landmark_prob,
                         city_idx=1 if (len(skins) > 1 and sk == "nyc") else 0)
        n_train = num_routes // len(skins)
        n_held = num_heldout_routes // len(skins)
        taken, pairs = set(), set()
        for k, anchors in enumerate(_virl_make_routes(city, rng, n_train + n_held, taken, pairs)):
            rid = f"{sk}_{'route' if k < n_train else 'heldout'}_{k:04d}"
            (train if k < n_train else heldout).append(_virl_route_dict(city, anchors, rng, rid))
        for pi, (xy, kind, key) in enumerate(city.points):  # landmarks are final now: render
            pano_id = f"{sk}_{ci:02d}_{pi:05d}"
            rotation = rng.randrange(360)
            city.render(xy, kind, key, pano_size, rotation).save(views / f"{pano_id}.jpg", quality=90)
            geo = city.latlng(xy)
            (views / f"{pano_id}.metadata.json").write_text(json.dumps(
                {"pano_id": pano_id, "rotation": rotation, "geocode": list(geo), "skin": sk}))
            mapping[geo] = pano_id
    paths = virl_world_files(out)
    Path(paths["route_info_path"]).write_text(json.dumps([train, len(train)], indent=1))
    Path(paths["heldout_route_info_path"]).write_text(json.dumps([heldout, len(heldout)], indent=1))
    with open(paths["gps_to_pano_path"], "wb") as f:
        pickle.dump(mapping, f)
    return paths


def make_world(world: str, seed: int, out) -> dict:
    """Generate world `world` (a key of VIRL_WORLDS) into a temporary folder next to `out` and rename it to `out` when
    complete, so concurrent ranks never see half a world; nothing to do when `out` already holds one."""
    out = Path(out)
    if not (out / "gps_pano_mapping.pkl").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}_", dir=out.parent))
        try:
            generate_virl_world(tmp, seed=seed, **VIRL_WORLDS[world])
            os.replace(tmp, out)
        except OSError:  # another process renamed its copy first
            if not (out / "gps_pano_mapping.pkl").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return virl_world_files(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="nyc", choices=sorted(VIRL_WORLDS),
                        help="a city skin (300 training + 60 held-out routes) or vln_mini (18 routes, 9 skins)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: where envs.virl_world_paths looks)")
    args = parser.parse_args()
    out = Path(args.out or virl_world_dir(args.world, args.seed))
    make_world(args.world, args.seed, out)
    print(f"V-IRL world {args.world!r}, seed {args.seed}: {out}")
