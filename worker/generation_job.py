"""A text-generation prediction: generate for each prompt, publishing pieces live, then finish.

Generation jobs run alone (never in a micro-batch): each one writes tokens one at a time and
publishes them to ``app.generation_stream`` for the web's Server-Sent Events relay.
"""

from __future__ import annotations

from collections.abc import Callable

from app.generation_stream import Publisher
from app.jobs import attempts, states
from app.jobs.schemas import PredictSpec
from app.settings import Settings
from worker import failpoints
from worker.recorder import Recorder


def run(spec: PredictSpec, prepared, recorder: Recorder, settings: Settings, *, load,
        stopped: Callable[[str], str]) -> str:
    """Generate text for the spec's prompts with the prepared model and finish the job with it.

    The recorder's stop reason is read after every piece; a stop ends the attempt through
    ``stopped(reason)`` (the runner's own handling: cancelled, paused, requeued, stale or timeout).
    """
    from worker.ml import generation, prediction

    model_ref, _, digest = prepared.model
    prompts = spec.prompts()
    publisher = Publisher(settings, recorder.job_id, recorder.token)
    publisher.add("start")
    reasons: list[str] = []

    def on_text(index: int, text: str) -> None:
        publisher.add("text", index=index, text=text)
        failpoints.token_pause()
        reason = recorder.stop_reason()
        if reason:
            reasons.append(reason)
            raise _Stop(reason)

    sampling = generation.Sampling(
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
        seed=spec.seed, stop=tuple(spec.stop or ()), beam_size=spec.beam_size)
    try:
        output = prediction.generate(load, prompts, sampling, device="cpu", digest=digest, on_text=on_text)
    except _Stop:
        return stopped(reasons[0])
    with recorder.final("finish") as session:
        attempts.finish(session=session, job_id=recorder.job_id, token=recorder.token, to=states.SUCCEEDED,
                        result={"model": model_ref, **output},
                        message=f"generated text for {len(prompts)} prompt(s) with {model_ref}")
    publisher.add("done")
    return states.SUCCEEDED


class _Stop(Exception):
    """Raised inside generation when the attempt must stop (cancel, pause, shutdown, lease lost, timeout)."""
