"""The paper's command lines parse unchanged, with the paper's meanings."""

from __future__ import annotations

import shlex

import pytest

from utils.args import parse_ptq_args, parse_train_args

# scripts/2_eval_ptq.sh of the paper, with its placeholders filled in
PAPER_PTQ = """
--input_model meta-llama/Llama-2-7b-hf --do_train False --do_eval True --per_device_eval_batch_size 4
--model_max_length 2048 --fp16 False --bf16 True --save_safetensors False --w_bits 4 --a_bits 4 --k_bits 4
--v_bits 4 --w_clip --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128 --rotate
--optimized_rotation_path /tmp/R.bin
"""


def test_paper_ptq_command_line():
    args = parse_ptq_args(shlex.split(PAPER_PTQ))
    assert args.input_model == "meta-llama/Llama-2-7b-hf"
    assert (args.w_bits, args.a_bits, args.k_bits, args.v_bits) == (4, 4, 4, 4)
    assert args.w_clip and args.a_asym and args.k_asym and args.v_asym and args.rotate
    assert not args.w_asym and not args.w_rtn and not args.fp16 and args.bf16
    assert args.k_groupsize == 128 and args.per_device_eval_batch_size == 4
    assert args.optimized_rotation_path == "/tmp/R.bin"


def test_readme_flags_are_all_accepted():
    line = (
        "--access_token tok --rotate_mode random --rotation_seed 3 --fp32_had --w_groupsize 128 --w_asym --w_rtn "
        "--a_groupsize 64 --a_clip_ratio 0.9 --k_clip_ratio 0.95 --v_clip_ratio 1.0 --int8_down_proj "
        "--nsamples 64 --percdamp 0.05 --act_order --seed 7 --output_dir out --local_rank 0 --logging_dir x"
    )
    args = parse_ptq_args(shlex.split(line))
    assert args.rotate_mode == "random" and args.rotation_seed == 3 and args.fp32_had
    assert args.w_groupsize == 128 and args.w_asym and args.w_rtn and args.int8_down_proj
    assert args.a_clip_ratio == 0.9 and args.nsamples == 64 and args.percdamp == 0.05 and args.act_order


@pytest.mark.parametrize("value,expected", [("True", True), ("false", False), ("1", True), ("no", False)])
def test_booleans_take_values_or_act_as_switches(value, expected):
    assert parse_ptq_args(["--rotate", value]).rotate is expected
    assert parse_ptq_args(["--rotate"]).rotate is True
    assert parse_ptq_args([]).rotate is False


@pytest.mark.parametrize(
    "line,message",
    [
        ("--w_bits 0", "--w_bits must be in 1..16"),
        ("--k_groupsize 0", "--k_groupsize must be -1 or positive"),
        ("--a_clip_ratio 1.5", "--a_clip_ratio must be in"),
        ("--bf16 True --fp16 True", "exclusive"),
        ("--export_to_et", "--save_qmodel_path"),
        ("--rotate maybe", "expected a boolean"),
        ("--no_such_flag 1", "unrecognized arguments"),
    ],
)
def test_bad_flags_are_named(line, message, capsys):
    with pytest.raises(SystemExit):
        parse_ptq_args(shlex.split(line))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, variant, online",
    [
        ("", "had", True),
        ("--variant had", "had", True),
        ("--variant no_had", "no_had", False),
        ("--online_hadamard False", "no_had", False),
        ("--online_hadamard", "had", True),
        ("--variant no_had --online_hadamard False", "no_had", False),
    ],
)
def test_variant_flag_and_its_alias(extra, variant, online):
    for parse in (parse_ptq_args, parse_train_args):
        args = parse(shlex.split(f"--rotate {extra}"))
        assert (args.variant, args.online_hadamard) == (variant, online)


def test_contradicting_variant_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        parse_ptq_args(["--variant", "had", "--online_hadamard", "False"])
    assert "--variant had contradicts --online_hadamard False" in capsys.readouterr().err
