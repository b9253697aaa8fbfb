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

    class ImageURL(BaseModel):
        url: ImageData

    class ContentPart(BaseModel):
        type: Literal["text", "image_url"]
        text: Optional[Text] = None
        image_url: Optional[ImageURL] = None

    class Content(BaseModel):
        content: list[ContentPart] = Field(..., max_length=many)

    class RerankRequest(BaseModel):
        model: Optional[Name] = Field(None, description="a rerank stage's name or model (default: the first)")
        query: Union[Text, Content]
        documents: Union[Annotated[list[Union[Text, ContentPart]], Field(max_length=many)], Content]
        top_n: Optional[int] = Field(None, ge=1)
        return_documents: bool = False

    class EmbeddingRequest(BaseModel):
        input: Union[Text, Annotated[list[Union[Text, ContentPart]], Field(max_length=many)]]
        model: Optional[Name] = None
        encoding_format: Literal["float"] = "float"

    return SimpleNamespace(Text=Text, Name=Name, Search=SearchRequest, ImageURL=ImageURL, ContentPart=ContentPart,
                           Content=Content, Rerank=RerankRequest, Embedding=EmbeddingRequest)
