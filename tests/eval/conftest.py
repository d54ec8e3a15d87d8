import pytest
import torch


@pytest.fixture(scope="session")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_fp32(one_thread):
    """The embedded SmolLM2-135M-Instruct widened to float32 (the weights the lm-eval golden files saw)."""
    import corral

    return corral.load(quant="none")


@pytest.fixture(scope="session")
def fp32_scorer(smollm2_fp32):
    from corral.eval.loglik import LocalModel

    return LocalModel.from_llm(smollm2_fp32)
