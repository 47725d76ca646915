from dataclasses import dataclass, field
from typing import Literal

import pytest

from quantsink.errors import UsageError
from quantsink.registry import Registry
from quantsink.spec import Spec, build, parse_spec, split_specs


def test_parse_spec_reads_name_and_params():
    assert parse_spec("w8a8:act_bits=6,act_gran=token") == Spec("w8a8", (("act_bits", "6"), ("act_gran", "token")))
    assert parse_spec(" INT8 ") == Spec("int8")


@pytest.mark.parametrize("bad", ["", ":x=1", "int8:threshold", "int8:=3", "int8:a=1,a=2", "a=b"])
def test_malformed_specs_are_usage_errors(bad):
    with pytest.raises(UsageError, match="malformed spec"):
        parse_spec(bad)


def test_split_specs_keeps_params_with_their_name():
    specs = split_specs("sink-fp:k=2,smooth,clip-residual:tau=5,max=100")
    assert [s.name for s in specs] == ["sink-fp", "smooth", "clip-residual"]
    assert specs[2].params == (("tau", "5"), ("max", "100"))


@dataclass(frozen=True)
class Toy:
    name: str = field(default="toy", metadata={"spec": False})
    bits: int = 8
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    group: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError("bits must be in 2..8")


def test_build_coerces_types_and_validates():
    toy = build(Toy, parse_spec("toy:bits=4,scale=0.5,mode=b,flag=true,group=none"))
    assert toy == Toy(bits=4, scale=0.5, mode="b", flag=True, group=None)
    assert build(Toy, parse_spec("toy:group=64")).group == 64
    with pytest.raises(UsageError, match="bits must be in 2..8"):
        build(Toy, parse_spec("toy:bits=9"))
    with pytest.raises(UsageError, match="not one of a, b"):
        build(Toy, parse_spec("toy:mode=c"))
    with pytest.raises(UsageError, match="unknown parameter 'bitz'; valid: bits, flag, group, mode, scale"):
        build(Toy, parse_spec("toy:bitz=4"))
    with pytest.raises(UsageError, match="not a valid int"):
        build(Toy, parse_spec("toy:bits=four"))


def test_registry_suggests_close_match_and_lists_names():
    reg: Registry[int] = Registry("scheme")
    reg.register("int8", 1, aliases=("llm.int8",))
    reg.register("nf4", 2)
    assert reg.get("LLM.INT8") == 1
    with pytest.raises(UsageError) as err:
        reg.get("int9")
    assert "Did you mean 'int8'?" in str(err.value) and "int8, nf4" in str(err.value)
    with pytest.raises(ValueError):
        reg.register("nf4", 3)


def test_spellings_of_one_scheme_share_a_run_id():
    from quantsink.config import RunConfig
    from quantsink.pipeline.plan import canonical, run_id_for

    def rid(scheme: str, mitigation: str = "none") -> str:
        return run_id_for(canonical(RunConfig(scheme=scheme, mitigation=mitigation)), "m", "c")

    assert len({rid(s) for s in ("int8", "INT8", "llm.int8", "int8:threshold=6.0", "int8:threshold=6")}) == 1
    assert rid("int8:threshold=0") != rid("int8")
    assert canonical(RunConfig(scheme="LLM.int8:threshold=6")).scheme == "int8"
    assert rid("w8a8", "sink-fp") == rid("w8a8", "SINK-FP:k=1") != rid("w8a8", "sink-fp:k=2")
    assert rid("w8a8", "sink-fp,smooth") != rid("w8a8", "smooth,sink-fp")  # order is applied order
