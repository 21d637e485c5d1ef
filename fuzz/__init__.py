"""
monedge's own fuzzing of its request path; not shipped with monedge.

- C{fuzz/request_path.py}: the atheris target;
- L{fuzz.checker}: the invariants it checks on each input, its seed writer
  and its libFuzzer dictionary (also used by C{tests/test_fuzz.py});
- C{fuzz/seeds.py}: writes the seed corpus and the dictionary;
- C{fuzz/run.sh}: the bounded run C{make test} makes;
- C{fuzz/regressions/}: crash reproducers, each a seed and a named test.
"""
