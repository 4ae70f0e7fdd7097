"""CPU-bound RSA work (generation, for any public exponent, and the primality checks of an imported key) in
worker processes: ``cryptography`` holds the GIL for it, which would stall every other request of the vault.

The pool starts on first use (about 0.1 s, paid by that request only) and is shut down with the vault;
until then the vault costs nothing for it. Where no process can be started, the work runs inline."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, List, Optional, Tuple, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

T = TypeVar("T")
RsaNumbers = Tuple[int, int, int, int, int, int, int, int]  # p, q, d, dp, dq, qi, e, n
OPENSSL_EXPONENTS = (3, 65537)  # the only ones cryptography generates keys for
# Primes drawn for another exponent before giving up: each fits with probability above 1/5 for any odd
# exponent below 2**31, so running out happens with probability below 10**-18.
MAX_PRIMES_DRAWN = 200


def _rsa_with_exponent(size: int, exponent: int) -> rsa.RSAPrivateKey:
    """A key of ``size`` bits for an exponent OpenSSL does not generate for: the primes of keys OpenSSL
    makes (random primes of half the size, each at least sqrt(2)·2^(size/2-1)), keeping those with
    gcd(exponent, p-1) = 1; then d and the CRT members for ``exponent``, and OpenSSL's full check."""
    half = size // 2
    fitting: List[int] = []
    for _ in range(MAX_PRIMES_DRAWN // 2):
        numbers = rsa.generate_private_key(public_exponent=65537, key_size=size).private_numbers()
        fitting += [p for p in (numbers.p, numbers.q) if math.gcd(exponent, p - 1) == 1]
        while len(fitting) >= 2:
            p, q = fitting.pop(), fitting.pop()
            if (p * q).bit_length() != size or abs(p - q).bit_length() <= half - 100:
                continue
            d = pow(exponent, -1, math.lcm(p - 1, q - 1))
            dp, dq, qi = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
            public = rsa.RSAPublicNumbers(exponent, p * q)
            return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key()
    raise ValueError(f"no primes fitting the exponent {exponent} were found")


def _generate_rsa(size: int, exponent: int) -> bytes:
    if exponent in OPENSSL_EXPONENTS:
        key = rsa.generate_private_key(public_exponent=exponent, key_size=size)
    else:
        key = _rsa_with_exponent(size, exponent)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validate_rsa(numbers: RsaNumbers) -> None:
    """cryptography's full check (OpenSSL's, primality included); ValueError if it fails."""
    p, q, d, dp, dq, qi, e, n = numbers
    rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def check_rsa_numbers(numbers: RsaNumbers) -> None:
    """The cheap part of an RSA key's check, done here: n = p·q, e·d = 1 modulo lcm(p-1, q-1), and the
    CRT members. ValueError if any fails."""
    p, q, d, dp, dq, qi, e, n = numbers
    if p < 3 or q < 3 or p * q != n:
        raise ValueError("n is not p·q")
    if not 1 < d < n or (e * d) % math.lcm(p - 1, q - 1) != 1:
        raise ValueError("d is not the inverse of e")
    if dp != d % (p - 1) or dq != d % (q - 1) or not 0 < qi < p or (qi * q) % p != 1:
        raise ValueError("the CRT members do not match p, q and d")


class CryptoWorkers:
    """A lazily started process pool; ``close`` shuts it down (and a later use starts it again)."""

    def __init__(self, processes: Optional[int] = None, inline: bool = False) -> None:
        self._processes = processes or min(4, os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._pool: Optional[Executor] = None
        self._inline = inline

    def _run(self, work: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._pool is None and not self._inline:
                try:
                    context = multiprocessing.get_context("spawn")
                    self._pool = ProcessPoolExecutor(self._processes, mp_context=context)
                except (OSError, ValueError, NotImplementedError):
                    self._inline = True
            pool = self._pool
        if pool is None:
            return work(*args)
        try:
            return pool.submit(work, *args).result()
        except (BrokenProcessPool, RuntimeError):  # the pool was shut down or a worker died
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            return work(*args)

    def generate_rsa(self, size: int, exponent: int) -> rsa.RSAPrivateKey:
        der = self._run(_generate_rsa, size, exponent)
        # made by our own worker just now: cryptography's check would only repeat its own work
        key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    def rsa_private_key(self, numbers: RsaNumbers) -> rsa.RSAPrivateKey:
        """An imported key, fully checked: the cheap checks here, primality in a worker."""
        check_rsa_numbers(numbers)
        self._run(_validate_rsa, numbers)
        p, q, d, dp, dq, qi, e, n = numbers
        public = rsa.RSAPublicNumbers(e, n)
        return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key(
            unsafe_skip_rsa_key_validation=True
        )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


INLINE = CryptoWorkers(inline=True)  # for callers without a vault: the same work, in this process
