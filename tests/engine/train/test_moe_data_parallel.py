"""An MoE model under FSDP2 (2 gloo ranks, experts sharded as any parameter): SFT with the router
losses gives one process's weights and curves with the same global batch."""
from fusedrl.engine.config.moe import RouterLossConfig
from fusedrl.engine.stages.sft import train_sft
from dist_testing import check, rank_threads, torchrun
from moe_testing import save_moe_base
from test_data_parallel import assert_same_curves, assert_same_weights
from train_testing import demonstrations, sft_config, write_jsonl


def test_moe_sft_two_ranks_match_one_process(tmp_path):
    base = save_moe_base(tmp_path / "base", "mixtral")
    write_jsonl(tmp_path / "train.jsonl", demonstrations(16))

    def run(name, ranks):
        return sft_config(base, tmp_path / "train.jsonl", tmp_path / name,
                          optim={"grad_accum_steps": 2} if ranks == 1 else {},
                          train={"max_steps": 2, "device": "cpu", "precision": "fp32"},
                          moe=RouterLossConfig(router_aux_loss_coef=0.01, router_z_loss_coef=0.001))

    check(torchrun("sft", run("two", 2), tmp_path))
    with rank_threads():
        train_sft(run("one", 1))
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")
    assert_same_curves(tmp_path / "two", tmp_path / "one", keys=("loss", "grad_norm", "router_aux_loss"))
