"""An agent program that trains a podsrl run through a rollout server's OpenAI endpoint (docs/TASKS.md,
"Driving episodes over HTTP (OpenAI API)"). It uses only the official ``openai`` client and the standard library.

    podsrl run --config configs/tiny.toml rollout.servers=1 rollout.http_port=8001 rollout.generate=false \\
        task.max_turns=2 task.max_episode_tokens=64 &
    python examples/http_agent.py --url http://127.0.0.1:8001 --groups 1000

Each group: n episodes of one copy question (n = the run's rollout.group_size), two turns each (the model
answers, is asked again), rewarded by the fraction of the question's letters its last answer has in place. Plain-text
completions: with a chat model use ``client.chat.completions`` the same way (its template must write the
end-of-turn token after an assistant message, as Qwen's and Llama 3's do).
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.request

from openai import OpenAI

EPISODE = "X-Podsrl-Episode"  # "new" opens a group of n episodes; an episode id continues one


def reward(url: str, token: str, episode: str, value: float) -> bool:
    """Report an episode's reward; True when it completed its group (the server pushed it to the selector)."""
    req = urllib.request.Request(
        f"{url}/podsrl/v1/episodes/{episode}/reward",
        data=json.dumps({"reward": value}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return bool(json.loads(r.read())["group_pushed"])


def in_place(answer: str, text: str) -> float:
    """The fraction of ``answer``'s characters ``text`` has in place (the built-in copy task's reward)."""
    return sum(a == b for a, b in zip(answer, text, strict=False)) / len(answer)


def play_group(client: OpenAI, url: str, token: str, question: str, answer: str, n: int, turns: int = 2) -> list[float]:
    """One group of n episodes of one or two turns; returns their rewards."""
    model = client.models.list().data[0].id
    opened = client.completions.create(model=model, prompt=question, n=n, extra_headers={EPISODE: "new"})
    episodes = (opened.model_extra or {})["podsrl"]["episodes"]  # one id per choice
    rewards = []
    for episode, choice in zip(episodes, opened.choices, strict=True):
        if turns == 1:
            rewards.append(in_place(answer, choice.text))
            reward(url, token, episode, rewards[-1])
            continue
        # the conversation as it was answered, then new text (the server stitches by tokens, never re-tokenizes
        # the model's turn: its text, special tokens included, gives back the tokens it sampled)
        prompt = question + choice.text + "="
        last = client.completions.create(model=model, prompt=prompt, extra_headers={EPISODE: episode})
        rewards.append(in_place(answer, last.choices[0].text))
        reward(url, token, episode, rewards[-1])
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8001")
    parser.add_argument("--token", default="none", help="a token of rollout.http_tokens_file, if it is set")
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--n", type=int, default=16, help="the run's rollout.group_size")
    parser.add_argument("--turns", type=int, default=2, choices=(1, 2))
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.token)
    rng = random.Random(0)
    for g in range(args.groups):
        word = "".join(rng.choice("abcdefghijkl") for _ in range(3))
        rewards = play_group(client, args.url, args.token, f"{word}=", word, args.n, args.turns)
        print(f"group {g}: mean reward {sum(rewards) / len(rewards):.3f}", flush=True)


if __name__ == "__main__":
    main()
