"""The two-engine route a user could build on vLLM, timed against rge on the same GPU and checkpoint.

vLLM cannot return the hidden states of generated tokens, so RGE's query path there takes two engines:
a generate engine that decodes the rationale greedily and stops at <emb>, then a pooling engine that
runs prompt + rationale again and pools the last token (the <emb> fed, or the last token of a rationale
that reached the budget, as the authors' extra forward pass does). Both share one GPU.

    pip install vllm                                     # a GPU machine; vLLM >= 0.11 (runner/convert API)
    python benchmarks/vllm_route.py --model MCG-NJU/RGE --queries 256
    python benchmarks/vllm_route.py --random-3b /tmp/rge-3b   # no download: random weights, 3B shapes

Random weights never emit <emb>: every rationale runs to the budget in both routes, which keeps the work
equal. The pooling engine gets prompt + rationale as text; where decoding and re-tokenising a rationale
gives other ids, its vector differs from rge's (the script counts those rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import build_encoder, query_workload  # noqa: E402

from rge import RGEEncoder  # noqa: E402
from rge.prompts import place_image  # noqa: E402
from rge.testing import QWEN25_VL_CHAT_TEMPLATE  # noqa: E402


def save_random(size: str, folder: Path, budget: int) -> Path:
    """A random-weight checkpoint with Qwen2.5-VL-3B's shapes and RGE's tokens, saved for both routes."""
    encoder = build_encoder(size, torch.device("cpu"), torch.bfloat16, budget, (256 * 28 * 28, 1024 * 28 * 28))
    encoder.model.save_pretrained(folder)
    encoder.checkpoint.tokenizer.save_pretrained(folder)
    encoder.checkpoint.vision.image_processor.save_pretrained(folder)
    encoder.model.generation_config.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN25_VL_CHAT_TEMPLATE)
    return folder


def prompts(encoder: RGEEncoder, texts: list[str], images: list) -> list[dict]:
    """vLLM prompts: the chat-formatted query text (one image placeholder block) and its image."""
    out = []
    for text, image in zip(texts, images):
        prompt = encoder.checkpoint.template.query(place_image(text, image is not None))
        out.append({"prompt": prompt, **({"multi_modal_data": {"image": image}} if image is not None else {})})
    return out


def run_vllm(model: str, requests: list[dict], emb_id: int, budget: int, penalty: float) -> dict:
    from vllm import LLM, SamplingParams

    generator = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.45, limit_mm_per_prompt={"image": 1})
    pooler = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.4, runner="pooling", convert="embed",
                 pooler_config={"pooling_type": "LAST", "normalize": True}, limit_mm_per_prompt={"image": 1})  # fmt: skip
    sampling = SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=[emb_id],
                              repetition_penalty=penalty, skip_special_tokens=False)  # fmt: skip
    generator.generate(requests[:4], sampling)  # warm-up
    pooler.embed(requests[:4])
    start = time.perf_counter()
    generated = generator.generate(requests, sampling)
    middle = time.perf_counter()
    second = [{**request, "prompt": request["prompt"] + out.outputs[0].text + ("<emb>" if emb_id in
               out.outputs[0].token_ids else "")} for request, out in zip(requests, generated)]  # fmt: skip
    vectors = pooler.embed(second)
    end = time.perf_counter()
    tokenizer = generator.get_tokenizer()
    retokenized = sum(tokenizer.encode(out.outputs[0].text, add_special_tokens=False)
                      != [t for t in out.outputs[0].token_ids if t != emb_id] for out in generated)  # fmt: skip
    return {
        "generate_seconds": middle - start, "pool_seconds": end - middle, "seconds": end - start,
        "generated_tokens": sum(len(out.outputs[0].token_ids) for out in generated),
        "rows_retokenized_differently": retokenized,
        "vectors": torch.tensor([v.outputs.embedding for v in vectors]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint folder or hub id")
    parser.add_argument("--random-3b", type=Path, help="save a random 3B-shaped checkpoint here and use it")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="rge's running rows")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/vllm-route.json"))
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        parser.exit(2, "vLLM is not installed here: pip install vllm (a CUDA machine), then run this again\n")
    model = str(save_random("3b", args.random_3b, args.budget) if args.random_3b else args.model)
    encoder = RGEEncoder.from_pretrained(model, max_new_tokens=args.budget)
    texts, images = query_workload(args.queries, with_images=True)
    requests = prompts(encoder, texts, images)
    penalty = encoder.generation_settings.repetition_penalty
    route = run_vllm(model, requests, encoder.checkpoint.emb_token_id, args.budget, penalty)
    encoder.encode_query(texts[:8], images=images[:8], batch_size=args.batch_size)  # warm-up (graph capture)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ours = encoder.encode_query(texts, images=images, batch_size=args.batch_size, convert_to_tensor=True)
    torch.cuda.synchronize()
    rge_seconds = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(route.pop("vectors").float(), ours.float().cpu())
    result = {**route, "rge_seconds": rge_seconds, "queries": args.queries, "budget": args.budget,
              "vllm_queries_per_s": args.queries / route["seconds"], "rge_queries_per_s": args.queries / rge_seconds,
              "rge_vs_vllm": route["seconds"] / rge_seconds, "cosine_median": float(cosine.median()),
              "device": torch.cuda.get_device_name(), "vllm": vllm.__version__}  # fmt: skip
    print(json.dumps(result, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
