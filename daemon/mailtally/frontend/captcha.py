"""Issue verification codes as signed tokens and draw them as noisy PNG images.

A token carries a random nonce, the form's session binding and the time it was made,
signed with the frontend's key; the code itself is derived from the nonce with an HMAC
of that key, so the token never reveals it and the server keeps nothing until the code
is used. Using a code records its nonce in the state file: a second use is refused.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mailtally.frontend.limits import State

ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: easy to read back
LENGTH = 6
WIDTH, HEIGHT = 240, 80


class Verdict(enum.Enum):
    OK = "ok"
    WRONG = "wrong"  # a valid token, the wrong answer
    EXPIRED = "expired"
    USED = "used"
    INVALID = "invalid"  # not our signature, or made for another session


@dataclass(frozen=True, slots=True)
class Issued:
    nonce: str
    binding: str
    made: float


class Codes:
    """Make and check verification codes; `clock` is time.time in service."""

    def __init__(self, secret: bytes, ttl: float, state: State, clock: Callable[[], float]):
        self._serializer = URLSafeSerializer(secret, salt="mailtally.frontend.code")
        self._key = hashlib.sha256(b"mailtally.frontend.code-key\0" + secret).digest()
        self._ttl = ttl
        self._state = state
        self._clock = clock

    def issue(self, binding: str) -> str:
        """Return a new token for a form of the session `binding`."""
        payload = {"n": secrets.token_urlsafe(16), "b": binding, "t": self._clock()}
        token: str = self._serializer.dumps(payload)
        return token

    def read(self, token: str) -> Issued | None:
        """The token's contents if it is ours, else None (no expiry check)."""
        try:
            data = self._serializer.loads(token)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        nonce, binding, made = data.get("n"), data.get("b"), data.get("t")
        if not isinstance(nonce, str) or not isinstance(binding, str):
            return None
        if not isinstance(made, int | float):
            return None
        return Issued(nonce, binding, float(made))

    def code(self, nonce: str) -> str:
        digest = hmac.new(self._key, nonce.encode(), hashlib.sha256).digest()
        return "".join(ALPHABET[b % len(ALPHABET)] for b in digest[:LENGTH])

    def check(self, token: str, binding: str, answer: str) -> Verdict:
        """Judge `answer` for `token`; any verdict but INVALID uses the code up."""
        issued = self.read(token)
        if issued is None or not hmac.compare_digest(issued.binding, binding):
            return Verdict.INVALID
        now = self._clock()
        if not issued.made - 5 <= now <= issued.made + self._ttl:
            return Verdict.EXPIRED
        if not self._state.use_code(issued.nonce, issued.made + self._ttl, now):
            return Verdict.USED
        given = "".join(answer.split()).upper().encode("utf-8", "replace")
        if not hmac.compare_digest(given, self.code(issued.nonce).encode()):
            return Verdict.WRONG
        return Verdict.OK

    def image(self, token: str) -> bytes | None:
        """The PNG showing the token's code, or None for a token not ours or expired."""
        issued = self.read(token)
        if issued is None or self._clock() > issued.made + self._ttl:
            return None
        return render(self.code(issued.nonce))


def render(code: str) -> bytes:
    """Draw `code` with rotated, jittered glyphs over noise lines and dots."""
    rng = random.Random(secrets.randbits(64))
    img = Image.new("RGB", (WIDTH, HEIGHT), _light(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        points = [(rng.randrange(WIDTH), rng.randrange(HEIGHT)) for _ in range(2)]
        draw.line(points, fill=_mid(rng), width=rng.choice((1, 2)))
    font = ImageFont.load_default(size=44)
    step = (WIDTH - 20) // len(code)
    for i, char in enumerate(code):
        glyph = Image.new("L", (60, 64), 0)
        ImageDraw.Draw(glyph).text((30, 32), char, font=font, fill=255, anchor="mm")
        glyph = glyph.rotate(rng.uniform(-28, 28), resample=Image.Resampling.BICUBIC)
        x = 10 + i * step + rng.randint(-4, 4) - (60 - step) // 2
        y = (HEIGHT - 64) // 2 + rng.randint(-6, 6)
        img.paste(Image.new("RGB", glyph.size, _dark(rng)), (x, y), glyph)
    for _ in range(WIDTH * HEIGHT // 25):
        draw.point((rng.randrange(WIDTH), rng.randrange(HEIGHT)), fill=_mid(rng))
    for _ in range(3):
        box = sorted(rng.sample(range(WIDTH), 2)), sorted(rng.sample(range(HEIGHT), 2))
        draw.arc([box[0][0], box[1][0], box[0][1], box[1][1]], 0, 300, fill=_dark(rng))
    out = io.BytesIO()
    img.filter(ImageFilter.SMOOTH).save(out, format="PNG")
    return out.getvalue()


def _light(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255))


def _mid(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(120, 200), rng.randint(120, 200), rng.randint(120, 200))


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 90), rng.randint(0, 90), rng.randint(0, 110))
