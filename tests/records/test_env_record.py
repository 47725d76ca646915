"""The environment a record keeps (issue 28): CPU model, threads, every scoring-path library's version;
records written before these facts still load and compare."""

from __future__ import annotations

import dataclasses

from quantsink.records.schema import EnvRecord, RunRecord
from synthetic_records import make_record

SCHEMA_2_ENV = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "bitsandbytes": "0.50.2",
                "cpu": "x86_64", "threads": 2, "device": "cpu", "cuda": None,
                "os": "Linux-6.18.44-fc-v657-x86_64-with-glibc2.36"}


def test_a_run_records_the_cpu_model_threads_and_every_scoring_library():
    import torch  # noqa: F401  (threads come from a loaded torch)

    from quantsink.env import SCORING_LIBRARIES
    from quantsink.pipeline.run import environment

    env = environment("cpu")  # raises if env.facts() gives a fact the record has no field for
    assert env.cpu_model and env.threads >= 1 and env.device == "cpu" and env.torch_build
    assert set(SCORING_LIBRARIES) <= set(env.libraries) and env.libraries["torch"]


def test_a_record_written_before_the_facts_still_loads_and_compares():
    data = make_record().to_dict()
    data["env"] = SCHEMA_2_ENV
    old = RunRecord.from_dict(data)
    assert old.env.transformers == "5.24.0" and old.env.cpu == "x86_64" and old.env.libraries == {}
    new = dataclasses.replace(old.env, transformers=None, torch=None, bitsandbytes=None, cpu=None,
                              machine="x86_64", cpu_model="AMD EPYC",
                              libraries={"torch": "2.13.0+cpu", "transformers": "5.25.0", "bitsandbytes": "0.50.2"})
    lines = old.env.differences(new)
    assert "transformers 5.24.0 vs 5.25.0" in lines and not any(line.startswith("torch") for line in lines)
    assert "only in a: cpu" in lines and any(line.startswith("only in b: ") and "cpu_model" in line for line in lines)
    assert old.env.differences(old.env) == []


def test_facts_leave_out_what_was_never_recorded_and_the_os():
    env = EnvRecord(os="Linux-1", threads=2, libraries={"bitsandbytes": None})
    assert env.facts() == {"threads": 2, "libraries": {"bitsandbytes": None}}
    assert env.differences(dataclasses.replace(env, os="Linux-2")) == []
