"""dora_minimal in a transformers training stack, side by side with Hugging Face PEFT: Trainer
checkpoints and resuming, PEFT's default targets per model type, and a classification head
trained in full (modules_to_save) saved and loaded both ways. Skipped where transformers (or
PEFT, accelerate, safetensors for the tests that need them) is not installed."""

import copy
import io
import json
import warnings

import pytest
import torch

import dora_minimal as dm
from dora_minimal.adapters import saved_modules
from helpers import rel_error

pytestmark = pytest.mark.interop  # needs PEFT or transformers: .ci/run checks that none skips
transformers = pytest.importorskip("transformers")
T = transformers


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2))


# --- Trainer: checkpoints, resume, gradient checkpointing -------------------------------------

def train(output_dir, resume_from=None, **arguments):
    """Six AdamW steps of a tiny Llama adapted with DoRA, checkpointed every 3 steps; returns
    the adapter and how many times one adapted layer ran forward."""
    model = dm.get_peft_model(tiny_llama(), dm.LoraConfig(r=2, use_dora=True))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 32, (16, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (newer transformers renames gradient_checkpointing)
        args = T.TrainingArguments(str(output_dir), max_steps=6, per_device_train_batch_size=4,
                                   learning_rate=1e-2, save_steps=3, report_to=[],
                                   use_cpu=True, logging_steps=100, seed=0, disable_tqdm=True,
                                   **arguments)
        T.Trainer(model, args, train_dataset=data).train(resume_from_checkpoint=resume_from)
    return dm.adapter_state_dict(model), len(calls)


def test_trainer_checkpoints_resumes_exactly_and_trains_the_same_with_gradient_checkpointing(
        tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("safetensors")
    initial = dm.adapter_state_dict(dm.get_peft_model(tiny_llama(), dm.LoraConfig(
        r=2, use_dora=True)))
    uninterrupted, calls = train(tmp_path / "run")
    assert calls == 6 and (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()
    assert all(not torch.equal(uninterrupted[k], initial[k]) for k in initial if "lora_B" in k)
    resumed, calls = train(tmp_path / "run", resume_from=tmp_path / "run" / "checkpoint-3")
    assert calls == 3  # steps 4 to 6 only
    checkpointed, calls = train(tmp_path / "gc", gradient_checkpointing=True)
    assert calls == 12  # each step's forward runs again in backward
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
        assert rel_error(checkpointed[key].numpy(), value.numpy()) < 1e-6, key


# --- target_modules=None: PEFT's defaults, model type by model type ---------------------------

FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=8,
                                                   n_layer=2, n_head=2)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=32, hidden_size=8, ffn_dim=16, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=8, max_position_embeddings=32)),
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_labels=3)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=40)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=32, d_model=8, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        max_position_embeddings=32)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, num_labels=3)),
    "whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=4,
        max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)),
}
# what PEFT 0.21.2 adapts with target_modules=None: (layer names, how many), None: it refuses
EXPECTED = {"llama": (["q_proj", "v_proj"], 4), "mistral": (["q_proj", "v_proj"], 4),
            "qwen2": (["q_proj", "v_proj"], 4), "gpt2": (["c_attn"], 2),
            "gpt_neox": (["query_key_value"], 2), "opt": (["q_proj", "v_proj"], 4),
            "bert": (["query", "value"], 4), "roberta": (["query", "value"], 4),
            "t5": (["q", "v"], 12), "bart": (["q_proj", "v_proj"], 6), "vit": None,
            "whisper": None}


def adapted(family, library, **config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]()
    task_type = "SEQ_CLS" if family == "bert" else None
    return library.get_peft_model(model, library.LoraConfig(use_dora=True, task_type=task_type,
                                                            **config))


@pytest.mark.parametrize("family", FAMILIES)
def test_target_modules_none_adapts_what_peft_adapts(family):
    if EXPECTED[family] is None:  # as PEFT, which asks: "Please specify `target_modules`"
        with pytest.raises(ValueError, match=f"model type '{family}'.*please specify "
                                             f"target_modules"):
            adapted(family, dm)
        return
    ours = adapted(family, dm)
    names = sorted(n for n, _ in dm.adapter_layers(ours))
    ends, count = EXPECTED[family]
    assert sorted({n.rpartition(".")[2] for n in names}) == ends and len(names) == count
    output = ours.get_output_embeddings()
    if output is not None and ours.config.tie_word_embeddings:  # the tie holds (T5, GPT-2)
        assert output.weight is ours.get_input_embeddings().weight
    peft = pytest.importorskip("peft")
    theirs = adapted(family, peft)
    assert names == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert dm.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]


def test_naming_a_tied_output_embedding_warns_that_the_tie_breaks():
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to \['transformer.wte'\]"):
        model = adapted("gpt2", dm, target_modules=["lm_head"])
    assert model.lm_head.weight is not model.transformer.wte.weight


# --- task heads, trained in full and saved both ways ----------------------------------------

def bert(cls, num_labels=3):
    return cls(T.BertConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_labels=num_labels))


# family: (the model, its task_type, target_modules, the heads trained in full); PEFT 0.22 adds
# classifier, score and pre_classifier (SEQ_CLS, TOKEN_CLS) or qa_outputs (QUESTION_ANS) to
# modules_to_save, each where the model has it
TASK_MODELS = {
    "bert": (lambda: bert(T.BertForSequenceClassification), "SEQ_CLS", None, ["classifier"]),
    "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=32, dim=8, hidden_dim=16, n_layers=2, n_heads=2, num_labels=3)),
        "SEQ_CLS", ["q_lin", "v_lin"], ["classifier", "pre_classifier"]),
    "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=40, num_labels=3)),
        "SEQ_CLS", None, ["classifier"]),
    "llama": (lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, num_labels=3)),
        "SEQ_CLS", None, ["score"]),
    "bert_token_cls": (lambda: bert(T.BertForTokenClassification), "TOKEN_CLS", None,
                       ["classifier"]),
    "bert_question_ans": (lambda: bert(T.BertForQuestionAnswering, 2), "QUESTION_ANS", None,
                          ["qa_outputs"]),
}


def task_output(model, ids):
    output = model(ids)
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else torch.cat([output.start_logits,
                                                         output.end_logits])).detach()


@pytest.mark.parametrize("family", TASK_MODELS)
def test_task_heads_train_in_full_and_load_both_ways_with_peft(tmp_path, family):
    peft = pytest.importorskip("peft")
    load_file = pytest.importorskip("safetensors.torch").load_file
    ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    make, task_type, targets, heads = TASK_MODELS[family]

    def base():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make().eval()

    def config(library):
        return library.LoraConfig(use_dora=True, task_type=task_type, target_modules=targets)

    ours = dm.get_peft_model(base(), config(dm))
    theirs = peft.get_peft_model(base(), config(peft))
    for head in heads:  # trained in full, never through an adapter
        module = ours.get_submodule(head)
        assert not dm.adapter_layers(module) and all(p.requires_grad
                                                      for p in module.parameters()), head
    assert sorted(n for n, _ in saved_modules(ours)) == sorted(heads)
    trainable = dm.trainable_parameters(ours).trainable, theirs.get_nb_trainable_parameters()[0]
    assert trainable[0] == trainable[1]
    task_output(ours.train(), ids).sum()  # a training step runs
    torch.manual_seed(2)
    with torch.no_grad():  # PEFT's adapter and heads away from their init
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    theirs.eval()
    expected = task_output(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dm.from_pretrained(base(), tmp_path / "theirs")  # PEFT -> ours
    theirs_to_ours = rel_error(task_output(loaded, ids).numpy(), expected.numpy())
    assert theirs_to_ours < 1e-6
    dm.save_pretrained(loaded, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (sorted(saved["modules_to_save"]), saved["task_type"]) == (sorted(heads), task_type)
    assert (load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
            == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys())
    reopened = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()  # ours -> PEFT
    assert type(reopened) is type(theirs)  # the task's class, from our task_type
    ours_to_theirs = rel_error(task_output(reopened, ids).numpy(), expected.numpy())
    assert ours_to_theirs < 1e-6
    largest = [(task_output(m, ids) - expected).abs().max().item() for m in (loaded, reopened)]
    print(f"\npeft {peft.__version__} {family}: PEFT->ours {largest[0]:.1e}, ours->PEFT "
          f"{largest[1]:.1e} (max |logits difference|), trainable ours {trainable[0]}, PEFT "
          f"{trainable[1]}")  # (python -m pytest -k task_heads -s prints the table)
    merged = dm.merge_and_unload(copy.deepcopy(loaded))
    assert not dm.adapter_layers(merged)
    assert rel_error(task_output(merged, ids).numpy(), expected.numpy()) < 1e-5
    for head in heads:
        trained = loaded.get_submodule(head).state_dict()
        assert all(torch.equal(t, trained[k]) for k, t in merged.get_submodule(head)
                   .state_dict().items()), head


def test_task_heads_absent_from_the_model_are_skipped_but_a_name_of_the_users_is_an_error():
    model = TASK_MODELS["llama"][0]()  # a score head: no classifier, no pre_classifier
    adapted = dm.get_peft_model(copy.deepcopy(model), dm.LoraConfig(task_type="SEQ_CLS"))
    assert [n for n, _ in saved_modules(adapted)] == ["score"]
    for task_type in ("SEQ_CLS", "QUESTION_ANS", None):  # qa_outputs is no SEQ_CLS head
        with pytest.raises(ValueError, match=r"modules_to_save: \['pre_classifer'\] match no "):
            dm.get_peft_model(copy.deepcopy(model), dm.LoraConfig(
                task_type=task_type, modules_to_save=["pre_classifer"]))
    with pytest.raises(ValueError, match=r"modules_to_save: \['qa_outputs'\] match no module"):
        dm.get_peft_model(copy.deepcopy(model), dm.LoraConfig(
            task_type="SEQ_CLS", modules_to_save=["qa_outputs"]))


# --- PEFT's Auto classes read our directories -------------------------------------------------

@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS", None])
def test_peft_auto_classes_load_our_adapter_with_its_base_from_disk(tmp_path, task_type):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    make = {"CAUSAL_LM": tiny_llama, None: tiny_llama,
            "SEQ_CLS": TASK_MODELS["llama"][0]}[task_type]
    torch.manual_seed(0)
    make().save_pretrained(tmp_path / "base")  # a pretrained model on local disk
    auto = {"CAUSAL_LM": T.AutoModelForCausalLM, None: T.AutoModelForCausalLM,
            "SEQ_CLS": T.AutoModelForSequenceClassification}[task_type]
    model = dm.get_peft_model(auto.from_pretrained(tmp_path / "base"), dm.LoraConfig(
        r=2, use_dora=True, task_type=task_type))
    with torch.no_grad():
        for _, layer in dm.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
    ids = torch.randint(1, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model.eval()(ids).logits.detach()
    dm.save_pretrained(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == task_type and saved["peft_type"] == "LORA"
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert "revision" in saved and saved["revision"] is None
    peft_auto = {"CAUSAL_LM": peft.AutoPeftModelForCausalLM, None: peft.AutoPeftModel,
                 "SEQ_CLS": peft.AutoPeftModelForSequenceClassification}[task_type]
    theirs = peft_auto.from_pretrained(tmp_path / "adapter").eval()
    assert rel_error(theirs(ids).logits.detach().numpy(), expected.numpy()) < 1e-6
    task_class = {"CAUSAL_LM": peft.PeftModelForCausalLM, None: peft.PeftModel,
                  "SEQ_CLS": peft.PeftModelForSequenceClassification}[task_type]
    assert type(peft.PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"),
                                               tmp_path / "adapter")) is task_class


# --- after Trainer: the whole model's save_pretrained, and the two right ways to export -------

def test_the_whole_models_save_pretrained_warns_that_from_pretrained_drops_the_adapter(
        tmp_path):
    pytest.importorskip("safetensors")
    model = dm.get_peft_model(tiny_llama(), dm.LoraConfig(r=2, use_dora=True))
    with torch.no_grad():
        for _, layer in dm.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
    ids = torch.randint(0, 32, (2, 5))
    expected = model(ids).logits.detach()
    with pytest.warns(UserWarning, match="from_pretrained of that folder drops those tensors"):
        model.save_pretrained(tmp_path / "adapted")  # what trainer.save_model writes
    with warnings.catch_warnings():  # once per model: a Trainer saves every save_steps, and
        warnings.simplefilter("error")  # its catch_warnings blocks reset Python's once-per-line
        model.save_pretrained(tmp_path / "adapted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the adapter's keys are unexpected in a plain Llama)
        plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "adapted")
    assert rel_error(plain(ids).logits.detach().numpy(), tiny_llama()(ids).logits.detach()
                     .numpy()) < 1e-6  # the base model: the adapter is gone, as warned
    copied = copy.deepcopy(model)  # the copy's save_pretrained saves the copy
    with torch.no_grad():
        copied.model.layers[0].self_attn.q_proj.lora_B.zero_()
    with pytest.warns(UserWarning, match="drops those tensors"):
        copied.save_pretrained(tmp_path / "copied")
    from safetensors.torch import load_file
    key = "model.layers.0.self_attn.q_proj.lora_B"
    assert not load_file(tmp_path / "copied" / "model.safetensors")[key].any()
    assert load_file(tmp_path / "adapted" / "model.safetensors")[key].any()
    buffer = io.BytesIO()  # the whole model pickled (torch.save) and back: still saves itself
    torch.save(copied, buffer)
    unpickled = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with pytest.warns(UserWarning, match="drops those tensors"):
        unpickled.save_pretrained(tmp_path / "unpickled")
    assert not load_file(tmp_path / "unpickled" / "model.safetensors")[key].any()
    # the right ways: the adapter in PEFT's files, or a plain model with the adapter merged in
    dm.save_pretrained(model, tmp_path / "adapter")
    loaded = dm.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert rel_error(loaded(ids).logits.detach().numpy(), expected.numpy()) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning once merged
        dm.merge_and_unload(model).save_pretrained(tmp_path / "merged")
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel_error(merged(ids).logits.detach().numpy(), expected.numpy()) < 1e-5
