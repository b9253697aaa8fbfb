"""The request bodies of ``genret serve``, made per app from its limits: every string in them is bounded (texts by
``max_text_chars``, names by 256, images by the body limit) and must be valid Unicode, every list by
``max_documents``; what breaks a bound is a 422 naming the field, before any model sees it."""

from types import SimpleNamespace
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from genret.serve.settings import ServeConfig

MAX_NAME_CHARS = 256


def valid_unicode(value: str) -> str:
    """``value``, unless it holds a lone surrogate (JSON's ``"\\ud800"``), which no model or JSON encoder takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(value[err.start]):04X}) at character "
                         f"{err.start}") from None
    return value


def request_models(config: ServeConfig) -> SimpleNamespace:
    """The request models and field types for ``config``'s limits (``.Text``, ``.Search``, ``.Rerank``, ...)."""
    Text = Annotated[str, StringConstraints(max_length=config.max_text_chars), AfterValidator(valid_unicode)]
    Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(valid_unicode)]
    ImageData = Annotated[str, StringConstraints(max_length=config.max_body_bytes), AfterValidator(valid_unicode)]
    many = config.max_documents

    class SearchRequest(BaseModel):
        """A search: a text, an image, or both (a composed query)."""

        text: Optional[Text] = Field(None, description="the query text; with an image, the modification (composed)")
        image: Optional[ImageData] = Field(None, description="the query image, base64 or a data:image/...;base64, URL")
        k: int = Field(10, description="results to return")
        target: Optional[Literal["image", "text"]] = Field(
            None, description="the gallery to search: images for a text or composed query, texts for an image (the "
                              "default; no other pairing is served)")
        instruction: Optional[Text] = Field(
            None, description="the task instruction of a pointwise reranker checkpoint's prompt (Qwen3-VL-Reranker's "
                              "<Instruct>); unset: the rerank stage's own")

    class ImageURL(BaseModel):
        url: ImageData

    class ContentPart(BaseModel):
        type: Literal["text", "image_url"]
        text: Optional[Text] = None
        image_url: Optional[ImageURL] = None

    class Content(BaseModel):
        content: list[ContentPart] = Field(..., max_length=many)

    class Document(BaseModel):
        """An object among documents: ``{"content": [parts]}`` (one document, vLLM's shape) or a bare content part
        (one document, genret's older shape); :mod:`genret.serve.documents` tells them apart and refuses an object
        that is both or neither."""

        type: Optional[Literal["text", "image_url"]] = None
        text: Optional[Text] = None
        image_url: Optional[ImageURL] = None
        content: Optional[Annotated[list[ContentPart], Field(max_length=many)]] = None

    # A string, an object, or a list of both (vLLM's ScoreInput | list[ScoreInput], and genret's older bare parts).
    Inputs = Union[Text, Annotated[list[Union[Text, Document]], Field(max_length=many)], Document]

    class RerankRequest(BaseModel):
        model: Optional[Name] = Field(None, description="a rerank stage's name or model (default: the first)")
        query: Union[Text, Content]
        documents: Inputs = Field(..., description="strings and {\"content\": [parts]} documents (vLLM's shape), "
                                                  "or bare parts, one document each (genret's older shape)")
        top_n: Optional[int] = Field(None, ge=0, description="results to return; 0 or unset: all (as vLLM)")
        return_documents: bool = Field(True, description="false: leave each result's document out")
        instruction: Optional[Text] = Field(
            None, description="the task instruction of a pointwise reranker checkpoint's prompt (Qwen3-VL-Reranker's "
                              "<Instruct>); unset: the rerank stage's own")

    class ScoreRequest(BaseModel):
        """vLLM's /score: one pair of fields, each side a string, an object or a list (1:1, 1:N or N:N pairs)."""

        model: Optional[Name] = Field(None, description="a rerank stage's name or model (default: the first)")
        queries: Optional[Inputs] = None
        documents: Optional[Inputs] = None
        items: Optional[Inputs] = None
        data_1: Optional[Inputs] = None
        data_2: Optional[Inputs] = None
        text_1: Optional[Inputs] = None
        text_2: Optional[Inputs] = None
        instruction: Optional[Text] = Field(
            None, description="the task instruction of a pointwise reranker checkpoint's prompt (Qwen3-VL-Reranker's "
                              "<Instruct>); unset: the rerank stage's own")

    class EmbeddingRequest(BaseModel):
        input: Union[Text, Annotated[list[Union[Text, ContentPart]], Field(max_length=many)]]
        model: Optional[Name] = None
        encoding_format: Literal["float"] = "float"
        # A bounded string checked by the route (a 400 naming the two values), not a Literal (a 422 from the schema).
        role: Optional[Name] = Field(
            None, json_schema_extra={"enum": ["query", "document", None]},
            description="embed the inputs as queries (unset: what a client compares against the gallery) or as "
                        "documents (as the gallery was indexed); an instructed MLLM embedder uses that role's "
                        "instruction, a CLIP-like encoder embeds both alike")

    return SimpleNamespace(Text=Text, Name=Name, Search=SearchRequest, ImageURL=ImageURL, ContentPart=ContentPart,
                           Content=Content, Document=Document, Rerank=RerankRequest, Score=ScoreRequest,
                           Embedding=EmbeddingRequest)
