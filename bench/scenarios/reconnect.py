from bench.results import Context, ScenarioResult


async def run(ctx: Context) -> ScenarioResult:
    raise NotImplementedError
