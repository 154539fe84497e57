"""Tests for tfmp.run_config: one run configuration, validated once, recorded in config.json."""

import json
import os
import re
import types

from absl.testing import parameterized

import tfmp
from tests import base
from tests.base import TestCase
from tfmp import run_config
from tfmp.optimizer_config import OptimizerConfig
from tfmp.run_config import ConfigMismatchError, RunConfig

_MODEL = {"model": "resnet_mini", "image_size": 32}


class RunConfigTest(TestCase):
    @parameterized.named_parameters(
        ("policy", dict(policy="fp16"), r"^Unknown `policy`: 'fp16'. Expected one of: "
         r"mixed_float16, mixed_bfloat16, float32, auto.$"),
        ("loss_scale_negative", dict(loss_scale="-2"), r"^`loss_scale` must be 'dynamic' or a "
         r"positive number. Received: loss_scale='-2'$"),
        ("loss_scale_word", dict(loss_scale="static"), "loss_scale='static'"),
        ("loss_scale_inf", dict(loss_scale="inf"), "loss_scale='inf'"),
        ("loss_scale_bool", dict(loss_scale=True), "loss_scale=True"),
        ("dataset", dict(dataset="mnist"), r"^Unknown `dataset`: 'mnist'. Expected an image "
         r"dataset, one of: synthetic, cifar10, imagenet2012.$"),
        ("text_dataset_for_images", dict(dataset="imdb_reviews"), "dataset='imdb_reviews'|"
         "'imdb_reviews'"),
        ("batch_size", dict(batch_size=0), r"^`batch_size` must be an integer >= 1. "
         r"Received: batch_size=0$"),
        ("batch_size_float", dict(batch_size=8.0), r"batch_size=8.0$"),
        ("epochs", dict(epochs=-1), "epochs=-1"),
        ("steps", dict(steps_per_epoch=0), r"^`steps_per_epoch` must be an integer >= 1 or "
         r"None. Received: steps_per_epoch=0$"),
        ("learning_rate", dict(learning_rate=0.0), "learning_rate=0.0"),
        ("optimizer", dict(optimizer="rmsprop"), r"^`optimizer` must be one of sgd, adam, "
         r"adamw, lamb. Received: optimizer='rmsprop'$"),
        ("label_smoothing", dict(label_smoothing=1.0), r"^`label_smoothing` must be a number "
         r"in \[0, 1\). Received: label_smoothing=1.0$"),
        ("distribution", dict(distribution="tpu"), "Unknown `distribution`: 'tpu'"),
        ("steps_per_execution", dict(steps_per_execution=0), r"^`steps_per_execution` must be "
         r"an integer >= 1. Received: steps_per_execution=0$"),
        ("steps_per_execution_bool", dict(steps_per_execution=True), "steps_per_execution=True"),
        ("steps_per_execution_not_dividing", dict(steps_per_epoch=6, steps_per_execution=4),
         r"^`steps_per_epoch` must be a multiple of `steps_per_execution` \(Keras runs whole "
         r"executions: each epoch would run 8 steps\). Received: steps_per_epoch=6, "
         r"steps_per_execution=4$"),
        ("jit_compile", dict(jit_compile="maybe"), r"^`jit_compile` must be one of 'auto', "
         r"'true', 'false' \(or a bool\). Received: jit_compile='maybe'$"),
        ("cpu_replicas", dict(cpu_replicas=0), "cpu_replicas=0"),
        ("seed", dict(seed=-1), r"^`seed` must be an integer >= 0. Received: seed=-1$"),
        ("num_synthetic", dict(num_synthetic=0), "num_synthetic=0"),
        ("model_dir_empty", dict(model_dir=""), r"^`model_dir` must be a path or None"),
        ("unknown_setting", dict(batchsize=8), r"^Unknown settings: batchsize. Expected some of"),
    )
    def test_bad_settings(self, settings, message):
        with self.assertRaisesRegex(ValueError, message):
            RunConfig.from_flat(settings)

    def test_text_recipe_takes_text_datasets_only(self):
        RunConfig(recipe="text_classification", dataset="imdb_reviews")
        with self.assertRaisesRegex(ValueError, "Expected a text dataset"):
            RunConfig(recipe="text_classification", dataset="cifar10")

    def test_frozen(self):
        with self.assertRaises(AttributeError):
            RunConfig().epochs = 3

    def test_json_round_trip(self):
        config = RunConfig(recipe="text_classification", dataset="synthetic_text", epochs=3,
                           loss_scale="512", optimizer=OptimizerConfig(
                               optimizer="sgd", lr_schedule="step", step_boundaries=(5, 9)))
        recorded = json.loads(json.dumps(config.to_json()))
        self.assertEqual(recorded["optimizer"]["step_boundaries"], [5, 9])
        self.assertEqual(RunConfig.from_json(recorded), config)
        self.assertEqual(RunConfig.from_flat(config.flat()), config)
        self.assertEqual(config.loss_scale_value, 512.0)

    def test_replace_validates(self):
        config = RunConfig()
        self.assertEqual(config.replace(epochs=3, optimizer="sgd").optimizer.optimizer, "sgd")
        self.assertEqual(config.epochs, 10)
        with self.assertRaisesRegex(ValueError, "momentum=1.5"):
            config.replace(momentum=1.5)

    def test_from_flags(self):
        values = dict(RunConfig().flat(), batch_size=32, step_boundaries=["100", "200"],
                      lr_schedule="step")
        del values["recipe"]
        holders = {name: types.SimpleNamespace(value=value) for name, value in values.items()}
        config = run_config.from_flags("image_classification", holders)
        self.assertEqual((config.batch_size, config.optimizer.step_boundaries), (32, (100, 200)))
        holders["step_boundaries"] = types.SimpleNamespace(value=["10", "x"])
        with self.assertRaisesRegex(ValueError, r"^`step_boundaries` must be comma-separated "
                                    r"integers \(steps\). Received: step_boundaries='10,x'$"):
            run_config.from_flags("image_classification", holders)

    def test_every_setting_is_a_flag(self):
        self.assertEqual(set(run_config.FLAGS), set(RunConfig().flat()) - {"recipe"})


class RecordRunTest(TestCase):
    """config.json: written by the first run, checked and appended to by the next."""

    def _read(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)

    def test_first_run_writes_atomically(self):
        model_dir = os.path.join(self.tmp_dir(), "run")
        config = RunConfig(batch_size=8)
        run_config.record_run(model_dir, config, _MODEL)
        self.assertEqual(os.listdir(model_dir), ["config.json"])  # no temporary left
        self.assertEqual(self._read(model_dir), {"config": config.to_json(), "model": _MODEL,
                                                 "resumes": []})

    def test_changes_that_may_happen_on_resume_are_recorded(self):
        model_dir = self.tmp_dir()
        run_config.record_run(model_dir, RunConfig(), _MODEL)
        run_config.record_run(model_dir, RunConfig(), _MODEL)  # the same: nothing changed
        run_config.record_run(model_dir, RunConfig(epochs=20, batch_size=64), _MODEL)
        self.assertEqual(self._read(model_dir)["resumes"],
                         [{}, {"batch_size": [128, 64], "epochs": [10, 20]}])
        self.assertEqual(self._read(model_dir)["config"]["epochs"], 20)

    @parameterized.named_parameters(
        ("model", RunConfig(), {**_MODEL, "model": "resnet50", "image_size": 64},
         r"^`model_dir` holds a run with image_size=32, model='resnet_mini'; this run has "
         r"image_size=64, model='resnet50'. Pass the same settings to resume that run, or a new "
         r"--model_dir for a new run. Received: model_dir='.*'$"),
        ("policy_and_dataset", RunConfig(policy="float32", dataset="cifar10"), _MODEL,
         r"^`model_dir` holds a run with dataset='synthetic', policy='mixed_float16'; this run "
         r"has dataset='cifar10', policy='float32'\."),
        ("optimizer", RunConfig(optimizer=OptimizerConfig(optimizer="sgd")), _MODEL,
         r"with momentum=None, optimizer='adam'; this run has momentum=0.9, optimizer='sgd'\."),
        ("accumulation", RunConfig(optimizer=OptimizerConfig(grad_accum_steps=2)), _MODEL,
         r"with grad_accum_steps=1; this run has grad_accum_steps=2\."),
        ("seed", RunConfig(seed=1), _MODEL, r"with seed=0; this run has seed=1\."),
    )
    def test_fixed_settings_are_refused(self, config, model, message):
        model_dir = self.tmp_dir()
        run_config.record_run(model_dir, RunConfig(), _MODEL)
        with self.assertRaisesRegex(ConfigMismatchError, message):
            run_config.record_run(model_dir, config, model)
        self.assertEqual(self._read(model_dir)["resumes"], [])  # nothing recorded

    def test_momentum_is_fixed_for_sgd_only(self):
        model_dir = self.tmp_dir()
        adam = RunConfig(optimizer=OptimizerConfig(momentum=0.9))
        run_config.record_run(model_dir, adam, _MODEL)
        run_config.record_run(model_dir, adam.replace(momentum=0.5), _MODEL)  # Adam has none
        sgd_dir = self.tmp_dir()
        sgd = adam.replace(optimizer="sgd", momentum=0.0)
        run_config.record_run(sgd_dir, sgd, _MODEL)
        with self.assertRaisesRegex(ConfigMismatchError, "momentum=0.0; this run has "
                                    "momentum=0.875"):
            run_config.record_run(sgd_dir, sgd.replace(momentum=0.875), _MODEL)

    def test_only_the_chief_writes(self):
        model_dir = self.tmp_dir()
        run_config.record_run(model_dir, RunConfig(), _MODEL, write=False)
        self.assertEqual(os.listdir(model_dir), [])

    def test_run_directory_of_an_older_tfmp_resumes(self):
        # Written by the recipes before config.json: run.json with the model settings.
        model_dir = self.tmp_dir()
        with open(os.path.join(model_dir, "run.json"), "w") as f:
            json.dump({"model_settings": {"recipe": "image_classification", **_MODEL,
                                          "dataset": "synthetic"}}, f)
        run_config.record_run(model_dir, RunConfig(), _MODEL)
        self.assertEqual(self._read(model_dir)["model"], _MODEL)
        os.remove(os.path.join(model_dir, "config.json"))
        with self.assertRaisesRegex(ConfigMismatchError, r"^`model_dir` holds a run with "
                                    r"image_size=32; this run has image_size=16\."):
            run_config.record_run(model_dir, RunConfig(), {**_MODEL, "image_size": 16})

    @parameterized.named_parameters(
        ("not_json", "{not json", r"^`model_dir` has an unreadable config.json "
         r"\(JSONDecodeError"),
        ("not_an_object", "[1, 2]", r"^`model_dir` has an unreadable config.json \(ValueError: "
         r"not a JSON object\)"),
        ("bad_config", '{"config": {"epochs": 0}, "model": {}}',
         r"^`model_dir` has an unreadable config.json \(ValueError: `epochs` must be"))
    def test_unreadable_file(self, text, message):
        model_dir = self.tmp_dir()
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            f.write(text)
        with self.assertRaisesRegex(ConfigMismatchError, message):
            run_config.record_run(model_dir, RunConfig(), _MODEL)


def _readme_recipes() -> str:
    with open(os.path.join(base.REPO, "README.md")) as f:
        text = f.read()
    return text[text.index("## Recipes"):text.index("## Multi-GPU")]


class ReadmeTest(TestCase):
    """The README's recipe table lists every flag, and its commands are valid configurations."""

    def test_table_lists_every_flag(self):
        from recipes import image_classification, text_classification

        table = _readme_recipes().split("| flag | meaning |")[1].split("\n\n")[0]
        listed = set(re.findall(r"`--(\w+)`", table))
        flags = (set(run_config.FLAGS) | {"verbose"} | set(image_classification._MODEL_FLAGS)
                 | set(text_classification._MODEL_FLAGS))
        self.assertEqual(flags - listed, set())  # every flag is documented
        self.assertEqual(listed - flags, set())  # and nothing else

    def test_commands_are_valid_configurations(self):
        from absl import flags

        from recipes import image_classification, text_classification

        recipes = {"image_classification": image_classification,
                   "text_classification": text_classification}
        commands = re.findall(r"python -m recipes\.(\w+) ((?:[^\n]|\\\n)+)",
                              _readme_recipes().replace("\\\n", " "))
        self.assertGreaterEqual(len(commands), 4)
        for name, line in commands:
            settings = {}
            for arg in line.split():
                key, value = arg[2:].split("=", 1)
                settings[key] = flags.FLAGS[key].parser.parse(value)  # as absl parses it
            recipe = recipes[name]
            if "step_boundaries" in settings:
                settings["step_boundaries"] = tuple(int(b) for b in settings["step_boundaries"])
            config = recipe.config(**{k: v for k, v in settings.items()
                                      if k in run_config.FLAGS})
            model_args = {k: v for k, v in settings.items() if k not in run_config.FLAGS}
            if name == "image_classification":
                tfmp.models.validate_image_model(model_args.get("model", "resnet_mini"),
                                                 image_size=model_args.get("image_size", 32))
            else:
                tfmp.models.validate_text_model(**{**dict(
                    seq_len=128, vocab_size=20_000, embed_dim=64, num_heads=4, num_layers=2),
                    **model_args})
            if config.steps_per_epoch and config.optimizer.lr_schedule != "constant":
                tfmp.optimizer_config.learning_rate_schedule(
                    config.optimizer, total_steps=config.steps_per_epoch * config.epochs,
                    global_batch_size=config.batch_size)  # the warm-up fits the run
