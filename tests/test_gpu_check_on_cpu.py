"""The GPU check command's parts, on the CPU: its PPO-clip baseline is verl's ``vanilla`` loss, its gradient check
agrees with float64 in float32, its loss timing goes through DisCO's registered loss, and it runs without verl."""

import subprocess
import sys
import textwrap

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

from recipe.disco import gpu_check


def test_ppo_clip_baseline_equals_verls_vanilla_loss_metrics_and_gradient():
    g = torch.Generator().manual_seed(0)
    rows, length = 12, 40
    old = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    current = old + 0.5 * torch.randn(rows, length, generator=g, dtype=torch.float64)  # ratios far outside 1 +- 0.2
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, length) * 4
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (rows, 1), generator=g)
    config = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    config.global_batch_info.update(dp_size=1, global_batch_size=rows, batch_num_tokens=None)

    ours, verls = current.clone().requires_grad_(True), current.clone().requires_grad_(True)
    loss, metrics = gpu_check.ppo_clip_loss(ours, old, advantages, mask)
    verl_loss, verl_metrics = get_policy_loss_fn("vanilla")(old, verls, advantages, mask, "token-mean", config)
    (loss + verl_loss).backward()

    torch.testing.assert_close(loss, verl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.grad, verls.grad, rtol=1e-12, atol=1e-12)
    assert metrics["clipfrac"] > 0 and metrics["clipfrac_lower"] > 0  # both clips are exercised
    for key in ("ppo_kl", "clipfrac", "clipfrac_lower"):
        assert (
            abs(
                metrics[key]
                - verl_metrics[key.replace("clipfrac", "actor/pg_clipfrac").replace("ppo_kl", "actor/ppo_kl")]
            )
            < 1e-6
        )


def test_gradient_check_agrees_with_float64_in_float32_with_the_hinge_active():
    results = gpu_check.gradient_errors("cpu", (torch.float32,))
    for case, by_dtype in results.items():
        kl, _ = by_dtype["kl"]
        error, cosine = by_dtype["float32"]
        assert kl > 1e-4, f"{case}: the trust-region hinge should be active (KL {kl} <= delta)"
        assert error < 1e-4 and cosine > 1 - 1e-8, (case, error, cosine)


def test_loss_timing_runs_disco_and_the_baseline_in_bf16():
    times = gpu_check.loss_times(16, 64, 1, "cpu", torch.bfloat16)
    assert set(times) == {"ppo_clip", "disco_step", "disco_question"}
    assert all(0 < seconds < float("inf") for seconds in times.values())


def test_the_check_runs_where_verl_is_not_installed():
    blocked = textwrap.dedent(
        """
        import sys, importlib.abc
        class NoVerl(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "verl":
                    raise ImportError("no verl here")
        sys.meta_path.insert(0, NoVerl())
        sys.argv = ["gpu_check", "--only", "gradient"]
        from recipe.disco import gpu_check
        gpu_check.main()
        print("loss module:", gpu_check.disco_modules()[1].__name__)
        print("estimate:", gpu_check.estimated_update_bytes())
        """
    )
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=True).stdout
    assert "disco logL tau 10, kl_unit step" in out and "loss module: recipe.disco.loss" in out
    assert int(out.split("estimate: ")[1].split()[0]) == gpu_check.estimated_update_bytes()  # the preflight's
