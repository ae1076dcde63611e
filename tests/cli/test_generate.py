"""dsjax-generate (``python -m dsjax.cli.generate``) on a hub directory."""

import numpy as np

from dsjax.cli.generate import main


def test_cli_on_a_hub_directory(capsys, fixtures_dir):
    ref = np.load(fixtures_dir / "v3_no_qlora" / "reference.npz")
    p = int(ref["greedy_prompt_len"])
    main(
        [
            "--checkpoint",
            str(fixtures_dir / "v3_no_qlora"),
            "--prompt-ids",
            ",".join(map(str, ref["greedy_ids"][0, :p])),
            "--max-new-tokens",
            "1",
        ]
    )
    assert capsys.readouterr().out.strip() == str(ref["greedy_ids"][0, p])


def test_a_missing_or_foreign_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --checkpoint {tmp_path / 'nope'}: no such directory\n"
    assert main(["--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
